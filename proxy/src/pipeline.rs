//! The HTTP request path, assembled in one place (ARCHITECTURE.md "Proxy request path"):
//!
//! ```text
//! load snapshot (once) -> request hygiene (http/hygiene.rs): authority decides the host,
//!   `_` header names dropped, path normalized (400 invalid-request / 307 on escaped slashes)
//!   -> inbound: peer identity header, authorization (403)
//!   -> listener's route table: match host, path, headers, method, query parameters
//!   -> no match: the listener's catch-all cluster (inbound: the local app) or 404 no-route
//!   -> route filters (`crate::filters`): fault delay / abort, redirect, direct response
//!      (answered here); around `forward`: request headers, rewrite, mirror, response headers
//!   -> weighted pick of a destination cluster -> round-robin endpoint (503 no-endpoints)
//!   -> rewrite headers/URI for the upstream HTTP version
//!   -> pooled upstream connection, under the route/cluster timeout (504 request-timeout)
//!        connect failure -> 503 connect-failed; closed before responding -> 502 upstream-reset
//!   -> response streamed back (trailers intact); metrics recorded once, when the body ends
//! ```
//!
//! Everything that needs the snapshot happens synchronously in [`HttpProxy::call`]; the future
//! only owns the chosen cluster and metric handles, so a request finishes on the configuration it
//! started with and no snapshot guard or lock is held across an await.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::{header, Request, Response, Version};
use hyper::body::Incoming;

use crate::attempts::{self, Answer};
use crate::authz::{self, AuthzRequest};
use crate::breaker::Limit;
use crate::cluster::{Cluster, UpstreamProtocol};
use crate::filters::{Decision, Forwarding, LocalAnswer};
use crate::http::body::{BodyTap, Completion, CountedBody, ResponseBody};
use crate::http::error::ProxyError;
use crate::http::headers::{prepare_request, strip_hop_by_hop};
use crate::http::hygiene;
use crate::http::idle::{Activity, InFlight};
use crate::http::request_timer::run_until;
use crate::metrics::{PeerHandles, RequestMetrics};
use crate::ratelimit::retry_after_secs;
use crate::retry::RetryPolicy;
use crate::route::{normalize_host, RequestInfo, RouteTable};
use crate::snapshot::{
    CatchAll, Direction, HttpListener, Listener, ListenerKind, Snapshot, SnapshotStore,
};
use crate::tls::spiffe::SpiffeId;
use crate::upstream::Wire;

/// Where a captured connection's requests go (transparent mode): decided by the connection's
/// original destination, not by the listener's routing, and resolved per request against the
/// snapshot in force so a push reaches long-lived connections. `crate::transparent` implements
/// it; the request path only asks.
pub trait CapturedRouting: Send + Sync {
    /// The routing of this connection's destination in `snapshot`.
    fn resolve(&self, snapshot: Option<&Arc<Snapshot>>) -> Routing;
}

/// A captured destination's routing: its route table (outbound: the destination service's
/// per-port table) and / or its catch-all (inbound: the app port's cluster).
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// Matched first.
    pub routes: Option<Arc<RouteTable>>,
    /// Where requests no route matches go.
    pub catch_all: Option<Arc<CatchAll>>,
}

/// The hyper service of one downstream HTTP connection.
#[derive(Clone)]
pub struct HttpProxy {
    store: Arc<SnapshotStore>,
    /// The listener as it was when the connection was accepted: used if a later snapshot no
    /// longer has an HTTP listener at this address (the connection is draining).
    accepted_on: Arc<Listener>,
    /// The client's verified mesh identity (inbound mTLS connections).
    peer: Option<Arc<SpiffeId>>,
    /// The request metric handles of `peer` (`tls="mtls"`, `peer=<id>`), resolved once per
    /// base handle for the whole connection ([`HttpProxy::request_metrics`]).
    peer_metrics: Option<Arc<PeerHandles>>,
    /// The downstream peer's IP address (ring hash on `source_ip`).
    source: Option<IpAddr>,
    /// Requests in flight on this connection (the listener's idle timeout).
    activity: Arc<Activity>,
    /// Transparent mode: the routing of a captured connection's destination, instead of the
    /// listener's.
    captured: Option<Arc<dyn CapturedRouting>>,
    /// The listener the connection's last request found in the snapshot ([`ListenerCache`]).
    listener_cache: ListenerCache,
}

/// The listener a connection's requests found in the snapshot in force, kept for the next
/// request while that snapshot stays in force: the lookup by address (a SipHash of the socket
/// address and a probe) is then one pointer comparison. Weak references only: an idle
/// connection keeps neither an old snapshot's contents nor its listener alive. A clone starts
/// empty.
///
/// A `RefCell`, not a mutex: a connection's service is used by its own task only, and a lock
/// plus unlock per request are two atomic read-modify-writes on the hot path.
#[derive(Default)]
struct ListenerCache(std::cell::RefCell<Option<CachedListener>>);

struct CachedListener {
    /// The snapshot looked in (held weakly: its allocation is not reused meanwhile, so the
    /// pointer comparison cannot match another snapshot).
    snapshot: Weak<Snapshot>,
    /// Its HTTP listener at the connection's address (`None`: it has none).
    listener: Option<Weak<Listener>>,
}

impl Clone for ListenerCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl ListenerCache {
    /// The HTTP listener at `addr` in `snapshot`, `None` if it has none.
    fn get(&self, snapshot: &Arc<Snapshot>, addr: &SocketAddr) -> Option<Arc<Listener>> {
        let mut cached = self.0.borrow_mut();
        if let Some(c) = &*cached {
            if std::ptr::eq(c.snapshot.as_ptr(), Arc::as_ptr(snapshot)) {
                match &c.listener {
                    None => return None,
                    // Always alive: the snapshot (held by the caller) holds it.
                    Some(l) => {
                        if let Some(l) = l.upgrade() {
                            return Some(l);
                        }
                    }
                }
            }
        }
        let found = snapshot
            .listeners
            .get(addr)
            .filter(|l| matches!(l.kind, ListenerKind::Http(_)));
        *cached = Some(CachedListener {
            snapshot: Arc::downgrade(snapshot),
            listener: found.map(Arc::downgrade),
        });
        found.cloned()
    }

    /// Forgets the cached lookup (the connection goes quiet).
    fn clear(&self) {
        self.0.borrow_mut().take();
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// Where a request goes, decided synchronously from the snapshot.
struct Target {
    cluster: Arc<Cluster>,
    metrics: Arc<RequestMetrics>,
    route_timeout: Option<Duration>,
    retry: Option<Arc<RetryPolicy>>,
    /// The route's rate limit refused the request: `Retry-After` seconds.
    rate_limited: Option<u64>,
    /// The downstream peer's IP address.
    source: Option<IpAddr>,
    /// Held until the response ends (the connection is not idle meanwhile).
    in_flight: InFlight,
    /// The route's filters still to apply around `forward` (`crate::filters`).
    filters: Option<Forwarding>,
    /// Sees the request body as it is forwarded (a mirror's copy).
    body_tap: Option<Box<dyn BodyTap>>,
}

/// What `select` decided.
enum Selected {
    /// Forward to a cluster.
    Forward(Target),
    /// The route answers itself (fault abort, redirect, direct response), counted in these
    /// handles; the request stays in flight until then.
    Answer(LocalAnswer, Arc<RequestMetrics>, InFlight),
}

impl HttpProxy {
    /// The service for a connection accepted on `listener` (an HTTP listener).
    pub fn new(store: Arc<SnapshotStore>, listener: Arc<Listener>) -> Self {
        Self {
            store,
            accepted_on: listener,
            peer: None,
            peer_metrics: None,
            source: None,
            activity: Activity::new(),
            captured: None,
            listener_cache: ListenerCache::default(),
        }
    }

    /// This service for a captured connection: its requests are routed as `routing` says
    /// (transparent mode), not by the listener's route table and catch-all.
    #[must_use]
    pub fn with_captured(mut self, routing: Arc<dyn CapturedRouting>) -> Self {
        self.captured = Some(routing);
        self
    }

    /// This service for a connection from `addr` (the source IP a `source_ip` ring hash uses).
    #[must_use]
    pub fn with_source(mut self, addr: SocketAddr) -> Self {
        self.source = Some(addr.ip());
        self
    }

    /// Forgets what the connection's requests cached (it hibernates: nothing of an old snapshot
    /// is kept for it).
    pub fn forget_cached(&self) {
        self.listener_cache.clear();
    }

    /// The connection's request activity and the listener's idle timeout (as accepted).
    pub fn idle(&self) -> (Arc<Activity>, Duration) {
        (Arc::clone(&self.activity), self.accepted_on.idle_timeout)
    }

    /// This service for a connection whose client proved `peer` (inbound mTLS).
    #[must_use]
    pub fn with_peer(mut self, peer: Option<SpiffeId>) -> Self {
        self.peer_metrics = peer
            .as_ref()
            .map(|p| Arc::new(PeerHandles::new(p.as_str())));
        self.peer = peer.map(Arc::new);
        self
    }

    /// The handles this connection's requests are counted with, for the snapshot's `base`
    /// (direction, route, cluster): with a verified peer (inbound mTLS), its variant labelled
    /// `tls="mtls"`, `peer=<SPIFFE ID>` (or `peer="other"` past
    /// [`crate::metrics::MAX_PEERS_PER_HANDLE`] callers), resolved on the connection's first
    /// request through `base` and reused; otherwise `base` itself (outbound handles carry their
    /// cluster's transport already, plaintext inbound ones `tls="none"`, `peer=""`).
    pub fn request_metrics(&self, base: &Arc<RequestMetrics>) -> Arc<RequestMetrics> {
        match &self.peer_metrics {
            Some(handles) => handles.resolve(base),
            None => Arc::clone(base),
        }
    }

    /// Routes `req` against the listener's current config: `Err` is a finished 404. A route's
    /// filters decide here too (fault delay and abort, redirect, direct response:
    /// [`Selected::Answer`]); the rest of them ride in the target.
    fn select(
        &self,
        http: &HttpListener,
        routing: (Option<&RouteTable>, Option<&CatchAll>),
        req: &Request<Incoming>,
        in_flight: InFlight,
    ) -> Result<Selected, ProxyError> {
        let raw_host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let host: Cow<'_, str> = normalize_host(raw_host);
        let info = RequestInfo {
            host: &host,
            path: req.uri().path(),
            query: req.uri().query(),
            method: req.method(),
            headers: req.headers(),
        };
        let (routes, catch_all) = routing;
        if let Some(route) = routes.and_then(|t| t.find(&info)) {
            let dest = route.destinations.pick();
            if dest.is_some() || route.filters.is_some() {
                let rate_limited = route.rate_limit.as_ref().and_then(|(limit, refused)| {
                    limit.check().err().map(|wait| {
                        refused.inc();
                        retry_after_secs(wait)
                    })
                });
                // A route without destinations answers itself: its own handles.
                let answered_in = |f: &crate::filters::RouteFilters| {
                    let base = match dest {
                        Some(d) => d.metrics(),
                        None => f.answer_metrics().unwrap_or(http.no_route_metrics()),
                    };
                    self.request_metrics(base)
                };
                // Route filters (a refused request gets none of them).
                let mut filters = None;
                if let (Some(f), None) = (&route.filters, rate_limited) {
                    let peer = self.peer.as_deref().map(SpiffeId::as_str);
                    let cluster = dest.map_or("", |d| &*d.cluster.name);
                    match f.decide(req, peer, cluster) {
                        Decision::Answer(answer) => {
                            return Ok(Selected::Answer(answer, answered_in(f), in_flight));
                        }
                        Decision::Forward(forwarding) => filters = Some(forwarding),
                    }
                }
                let dest = match (dest, rate_limited) {
                    (Some(dest), _) => dest,
                    // A redirect / direct response refused by the route's rate limit.
                    (None, Some(secs)) => {
                        let metrics = route.filters.as_deref().map_or_else(
                            || self.request_metrics(http.no_route_metrics()),
                            answered_in,
                        );
                        let e = ProxyError::RateLimited(secs);
                        let answer = LocalAnswer::immediate(e.to_response());
                        return Ok(Selected::Answer(answer, metrics, in_flight));
                    }
                    // Not reached: a route without destinations answers every request itself
                    // (`Route::build` refuses any other).
                    (None, None) => {
                        return Err(ProxyError::NoRoute {
                            host: host.to_string(),
                            path: req.uri().path().into(),
                        })
                    }
                };
                return Ok(Selected::Forward(Target {
                    cluster: Arc::clone(&dest.cluster),
                    metrics: self.request_metrics(dest.metrics()),
                    route_timeout: route.timeout,
                    retry: route.retry.clone(),
                    rate_limited,
                    source: self.source,
                    in_flight,
                    filters,
                    body_tap: None,
                }));
            }
        }
        match catch_all {
            Some(c) => Ok(Selected::Forward(Target {
                cluster: Arc::clone(&c.cluster),
                metrics: self.request_metrics(&c.metrics),
                route_timeout: None,
                retry: None,
                rate_limited: None,
                source: self.source,
                in_flight,
                filters: None,
                body_tap: None,
            })),
            None => Err(ProxyError::NoRoute {
                host: host.to_string(),
                path: req.uri().path().into(),
            }),
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpProxy {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // Access log / tracing (`observe`): `None`, at the cost of one atomic load, unless
        // observability is on; may rewrite `traceparent`. Finished when the response body ends.
        match crate::observe::start(&self.accepted_on, &mut req) {
            None => self.proxy(req),
            Some(observation) => {
                let response = self.proxy(req);
                Box::pin(async move {
                    let mut response = response.await?;
                    crate::observe::attach(observation, &mut response);
                    Ok(response)
                })
            }
        }
    }
}

impl HttpProxy {
    /// The request path proper (everything [`HttpProxy::call`] does besides observing).
    /// Inlined into both branches of `call`: the request is not copied into its arguments.
    #[inline(always)]
    fn proxy(&self, mut req: Request<Incoming>) -> ResponseFuture {
        let start = Instant::now();
        // Dropped with the target, or when the response body ends.
        let in_flight = self.activity.begin();
        let snapshot = self.store.load();
        // The listener at this address in the snapshot in force, if it is still an HTTP one.
        let found = snapshot
            .as_ref()
            .and_then(|s| self.listener_cache.get(s, &self.accepted_on.addr));
        let current = found.as_ref().unwrap_or(&self.accepted_on);
        let ListenerKind::Http(http) = &current.kind else {
            // Connections are only served as HTTP when accepted on an HTTP listener.
            return Box::pin(async { Ok(Response::new(ResponseBody::local(Default::default()))) });
        };
        // A captured connection goes where its original destination says (transparent mode).
        let captured = self.captured.as_ref().map(|c| c.resolve(snapshot.as_ref()));
        let routing = match &captured {
            Some(r) => (r.routes.as_deref(), r.catch_all.as_deref()),
            None => (http.routes.as_ref(), http.catch_all.as_ref()),
        };
        // Authorization and routing decide on the path and host the app will act on
        // (`crate::http::hygiene`).
        if let Err(outcome) = hygiene::apply(&http.hygiene, &mut req) {
            let resp = outcome.to_response();
            self.request_metrics(http.no_route_metrics()).record(
                resp.status(),
                "",
                start.elapsed().as_secs_f64(),
            );
            tracing::debug!(?outcome, "request refused or redirected by request hygiene");
            return Box::pin(async move { Ok(resp) });
        }
        // Inbound: the app learns the verified caller (never a client-sent value), and the
        // listener's authorization policy decides before anything else (`crate::authz`).
        if current.direction == Direction::Inbound {
            let peer = self.peer.as_deref();
            authz::set_peer_identity(req.headers_mut(), peer, http.hygiene.allows_underscores());
            let request = AuthzRequest {
                peer,
                method: Some(req.method().as_str()),
                path: Some(req.uri().path()),
            };
            if let Err(policy) = authz::check(current.authz.as_deref(), &request) {
                if let Some(denied) = &current.authz_denied {
                    denied.inc();
                }
                tracing::debug!(%policy, peer = ?peer.map(SpiffeId::as_str), "request denied by authorization policy");
                let e = ProxyError::Forbidden(policy);
                // Counted like a response of the catch-all (`route` = listener name), else as
                // unrouted; attributed to the caller.
                let metrics = self.request_metrics(
                    routing
                        .1
                        .map_or_else(|| http.no_route_metrics(), |c| &c.metrics),
                );
                metrics.record(e.status(), "", start.elapsed().as_secs_f64());
                let resp = e.to_response();
                return Box::pin(async move { Ok(resp) });
            }
        }
        let limited = current.rate_limit.as_ref().and_then(|(limit, refused)| {
            limit.check().err().map(|wait| {
                refused.inc();
                ProxyError::RateLimited(retry_after_secs(wait))
            })
        });
        // ---- BEGIN upgrades and tunnels (`crate::http::upgrade`, `crate::http::connect`) ----
        // HTTP/1.1 upgrades (WebSocket), RFC 8441 extended CONNECT and CONNECT host:port leave
        // the request/response path here, after hygiene, authorization and the listener's rate
        // limit: an upgrade is routed like any request, its answer relayed and, on a 101,
        // spliced; a CONNECT is checked against the outbound listener's egress policy and
        // tunneled. `Upgrade: h2c` is none of them (served as plain HTTP/1.1).
        if limited.is_none() {
            if let Some(kind) = crate::http::upgrade::Kind::of(&req) {
                let down = crate::http::upgrade::Downstream {
                    listener: Arc::clone(current),
                    peer: self.peer.clone(),
                    activity: Arc::clone(&self.activity),
                };
                if kind == crate::http::upgrade::Kind::Connect {
                    let resources = snapshot.as_deref();
                    return Box::pin(crate::http::connect::serve(
                        req, resources, down, in_flight, start,
                    ));
                }
                return match self.select(http, routing, &req, in_flight) {
                    // The route's own answer (a redirect, direct response or fault abort); the
                    // other route filters do not apply to upgrades.
                    Ok(Selected::Answer(answer, metrics, _in_flight)) => {
                        Box::pin(async move { Ok(answer.respond(metrics, start).await) })
                    }
                    Ok(Selected::Forward(t)) => {
                        // The route's timeout, else the cluster's, bounds the handshake.
                        let routed = crate::http::upgrade::Routed {
                            timeout: t.route_timeout.or(t.cluster.request_timeout),
                            cluster: t.cluster,
                            metrics: t.metrics,
                            rate_limited: t.rate_limited,
                            source: t.source,
                            in_flight: t.in_flight,
                        };
                        Box::pin(crate::http::upgrade::forward(
                            req, kind, routed, down, start,
                        ))
                    }
                    Err(e) => {
                        let m = self.request_metrics(http.no_route_metrics());
                        m.record(e.status(), "", start.elapsed().as_secs_f64());
                        let resp = e.to_response();
                        Box::pin(async move { Ok(resp) })
                    }
                };
            }
        }
        // ---- END upgrades and tunnels ----
        let target = match limited {
            Some(e) => Err(e),
            None => self.select(http, routing, &req, in_flight),
        };
        let no_route_metrics = target
            .is_err()
            .then(|| self.request_metrics(http.no_route_metrics()));
        drop(snapshot);
        match target {
            // No wrapping `async` block: it would store the request and target a second time
            // next to the `forward` future inside it, in every request's (boxed) future. Only
            // routes with filters pay for theirs.
            Ok(Selected::Forward(mut target)) => match target.filters.take() {
                None => Box::pin(forward(req, target, start)),
                Some(filters) => Box::pin(forward_filtered(req, target, start, filters)),
            },
            Ok(Selected::Answer(answer, metrics, in_flight)) => Box::pin(async move {
                let resp = answer.respond(metrics, start).await;
                drop(in_flight);
                Ok(resp)
            }),
            Err(e) => {
                if let Some(m) = no_route_metrics {
                    m.record(e.status(), "", start.elapsed().as_secs_f64());
                }
                tracing::debug!(error = %e, "refused before routing");
                let resp = e.to_response();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

/// [`forward`] with the route's filters around it (`crate::filters`): the fault delay drawn in
/// `select`, then request header mutation, path/host rewrite and the mirror's copy before it,
/// and response header mutation on whatever it answers.
async fn forward_filtered(
    mut req: Request<Incoming>,
    mut target: Target,
    start: Instant,
    filters: Forwarding,
) -> Result<Response<ResponseBody>, Infallible> {
    if let Some(delay) = filters.delay() {
        tokio::time::sleep(delay).await;
    }
    target.body_tap = filters.before_forward(&mut req);
    let mut resp = forward(req, target, start).await?;
    filters.after_forward(&mut resp);
    Ok(resp)
}

/// Sends `req` to `target` and builds the downstream response (never an `Err`: failures are
/// proxy-generated responses).
async fn forward(
    mut req: Request<Incoming>,
    target: Target,
    start: Instant,
) -> Result<Response<ResponseBody>, Infallible> {
    let Target {
        cluster,
        metrics,
        route_timeout,
        retry,
        rate_limited,
        source,
        in_flight,
        filters: _,
        body_tap,
    } = target;
    let fail = |e: ProxyError| {
        tracing::debug!(cluster = %cluster.name, error = %e, "request failed");
        metrics.record(e.status(), "", start.elapsed().as_secs_f64());
        e.to_response()
    };
    if let Some(secs) = rate_limited {
        return Ok(fail(ProxyError::RateLimited(secs)));
    }
    let Some(any_endpoint) = cluster.endpoints.first() else {
        return Ok(fail(ProxyError::NoEndpoints {
            cluster: cluster.name.to_string(),
        }));
    };
    // Held until the response body ends (max_requests).
    let active = match cluster
        .state()
        .breaker
        .try_acquire(Limit::Requests, cluster.breaker.get(Limit::Requests))
    {
        Ok(p) => p,
        Err(l) => return Ok(fail(ProxyError::Overloaded(l))),
    };
    let downstream_version = req.version();
    let wire = match cluster.protocol {
        UpstreamProtocol::Http1 => Wire::H1,
        UpstreamProtocol::Http2 => Wire::H2,
        UpstreamProtocol::Preserve if downstream_version == Version::HTTP_2 => Wire::H2,
        UpstreamProtocol::Preserve => Wire::H1,
    };
    // Any endpoint's address is the authority of last resort (a request without any host).
    prepare_request(&mut req, wire, any_endpoint.addr);
    crate::observe::note_route(&req, metrics.route(), &cluster.name);
    let hash = cluster.request_hash(req.headers(), source);

    let limit = route_timeout.or(cluster.request_timeout);
    // From the request's arrival (no second clock read).
    let deadline = limit.map(|l| tokio::time::Instant::from_std(start) + l);
    let (head, body) = req.into_parts();
    let body = CountedBody::new(body, Arc::clone(&metrics)).with_tap(body_tap);
    // `attempts::send` is built where it is awaited: a local would be one more copy of it.
    let result = match (limit, deadline) {
        (Some(limit), Some(deadline)) => {
            // The connection's timer, re-armed (`crate::http::request_timer`).
            let timers = in_flight.activity().request_timer();
            let mut timer = timers.take(deadline);
            let result = run_until(
                attempts::send(
                    head,
                    body,
                    &cluster,
                    retry.as_deref(),
                    hash,
                    wire,
                    Some(deadline),
                    start,
                ),
                &mut timer,
            )
            .await;
            timers.put(timer);
            match result {
                Some(r) => r,
                None => return Ok(fail(ProxyError::RequestTimeout(limit))),
            }
        }
        _ => {
            attempts::send(
                head,
                body,
                &cluster,
                retry.as_deref(),
                hash,
                wire,
                deadline,
                start,
            )
            .await
        }
    };
    let Answer {
        response: resp,
        grpc_status,
        at,
    } = match result {
        Ok(ok) => ok,
        Err(e) => return Ok(fail(e)),
    };
    metrics.record_response_headers(at.saturating_duration_since(start).as_secs_f64());
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = downstream_version;
    // As sent downstream (a `Connection` option may have named it): looked up again only if
    // the upstream sent one.
    let grpc_status = match grpc_status {
        Some(_) => parts.headers.get(&attempts::GRPC_STATUS).cloned(),
        None => None,
    };
    let completion = Completion {
        grpc_status,
        status: parts.status,
        metrics,
        start,
        active: Some(active),
        in_flight: Some(in_flight),
    };
    Ok(Response::from_parts(
        parts,
        ResponseBody::upstream(body, completion),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn build() -> Arc<Snapshot> {
        let r = crate::snapshot::tests::resources();
        Arc::new(Snapshot::build(r, None, &Metrics::new().unwrap()).unwrap())
    }

    #[test]
    fn cached_listener_follows_the_snapshot_in_force() {
        let http_addr: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let tcp_addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let cache = ListenerCache::default();
        let first = build();
        let l1 = cache.get(&first, &http_addr).expect("HTTP listener");
        assert!(Arc::ptr_eq(&l1, &first.listeners[&http_addr]));
        // Same snapshot: the cached one.
        let again = cache.get(&first, &http_addr).unwrap();
        assert!(Arc::ptr_eq(&again, &l1));
        // Another snapshot (same config, new listener objects): looked up again.
        let second = build();
        let l2 = cache.get(&second, &http_addr).unwrap();
        assert!(Arc::ptr_eq(&l2, &second.listeners[&http_addr]));
        assert!(!Arc::ptr_eq(&l2, &l1));
        // The weak references keep nothing of the old snapshot alive.
        drop((l1, again, first));
        assert!(Arc::ptr_eq(
            &cache.get(&second, &http_addr).unwrap(),
            &second.listeners[&http_addr]
        ));
        // A TCP listener at the address, or none: `None` (cached as such), for the right key.
        let other = ListenerCache::default();
        assert!(other.get(&second, &tcp_addr).is_none());
        assert!(other.get(&second, &tcp_addr).is_none());
        let missing: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(ListenerCache::default().get(&second, &missing).is_none());
        // Cleared (hibernation): empty, and still correct afterwards.
        cache.clear();
        assert!(cache.0.borrow().is_none());
        assert!(cache.get(&second, &http_addr).is_some());
        // Cloned (a new connection's service): starts empty.
        let fresh = cache.clone();
        assert!(fresh.0.borrow().is_none());
        assert!(cache.0.borrow().is_some());
    }
}
