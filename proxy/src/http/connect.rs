//! CONNECT host:port on an outbound listener: an explicit egress tunnel (`curl -p -x`, HTTPS
//! through a proxy), ARCHITECTURE.md "Upgrades and tunnels".
//!
//! This module owns the egress decision and the TCP side of such a tunnel:
//! 1. the target is the request's authority, `host:port` (port required; an IPv6 host in
//!    brackets); anything else is 400 `invalid-request`. Only outbound listeners tunnel: an
//!    inbound one answers 405 `connect-not-allowed`;
//! 2. the outbound listener's egress policy ([`EgressPolicy`], from `Listener.egress`, the mesh's
//!    `egress:`) decides: absent, or `deny_unknown` off, allows every destination; otherwise
//!    the destination must be *known* — its host is a host name of a mesh service (any
//!    route's `hosts` in the listener's route table), or `host:port` is an external service
//!    the snapshot declares (`crate::egress::is_declared`: a static endpoint without identity,
//!    a DNS-declared endpoint, or an address such a name resolves to) — or its host must
//!    match an `allow_hosts` pattern (`api.example.com`, or `*.example.com` for any name below
//!    `example.com`, never `example.com` itself). A refusal is 403 `egress-denied`, counted in
//!    `weft_egress_denied_total{via="connect"}`. The decision reads the snapshot: the route
//!    table's host index, then the endpoints (linear), once per CONNECT (never on other
//!    requests);
//! 3. the host is resolved (an IP literal as is, a name by the system resolver) and its
//!    addresses tried in order until one accepts, within [`CONNECT_TIMEOUT`] in all: 503
//!    `connect-failed` / 504 `connect-timeout` otherwise;
//! 4. 200, then the [`super::upgrade::Tunnel`] splices the client and the TCP connection
//!    (idle timeout of the listener, `weft_tunnel_*{kind="connect"}`, an access log line with
//!    protocol `TCP` when it closes).
//!
//! The tunnel carries the app's bytes as they are: a CONNECT to a mesh service's host name
//! reaches whatever that name resolves to, in plaintext TCP, without the mesh's mTLS, routing
//! or the callee's authorization (use a plain request for those). CONNECT requests are not
//! counted in `weft_requests_total` (they have no route or cluster); the tunnel families count
//! them.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use weft_proto::v1;

use crate::http::body::ResponseBody;
use crate::http::idle::InFlight;
use crate::http::tunnel_metrics::{self, TunnelKind};
use crate::http::upgrade::{
    authority_of, hand_over, local_error, Downstream, Held, Prefixed, RequestInfo, Tunnel,
    TunnelInfo,
};
use crate::snapshot::{Direction, Snapshot};
use crate::tls::io::ClientIo;

/// Resolving the destination and connecting to it, all addresses tried, must fit in this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many resolved addresses are tried.
const MAX_ADDRESSES: usize = 8;

/// Where a CONNECT goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    /// Lower-case host name, or an IP address (IPv6 without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl ConnectTarget {
    /// The target of a CONNECT request: its authority, which must have a port.
    pub fn of<B>(req: &Request<B>) -> Result<Self, String> {
        let authority = req
            .uri()
            .authority()
            .ok_or_else(|| "CONNECT needs a host:port target".to_owned())?;
        let port = authority
            .port_u16()
            .ok_or_else(|| format!("CONNECT target {authority} has no port"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("CONNECT target {authority} has no host"));
        }
        Ok(Self { host, port })
    }

    /// The host as an IP address, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl std::fmt::Display for ConnectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// An outbound listener's egress policy (`Listener.egress`).
#[derive(Debug, Clone, Copy)]
pub struct EgressPolicy<'a> {
    /// Refuse destinations that are not known.
    pub deny_unknown: bool,
    /// Host patterns allowed anyway.
    pub allow_hosts: &'a [String],
}

impl<'a> EgressPolicy<'a> {
    /// From the listener's resource (`None`: allow everything).
    pub fn from_proto(p: Option<&'a v1::EgressPolicy>) -> Option<Self> {
        p.map(|p| Self {
            deny_unknown: p.deny_unknown,
            allow_hosts: &p.allow_hosts,
        })
    }
}

/// Whether `host` (lower-case) matches an `allow_hosts` `pattern`: equal (case-insensitive), or
/// `*.suffix` and `host` is a name strictly below `suffix`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Whether `target` is known to the outbound listener whose route table is `route_table`: its
/// host is a host name of a mesh service (a route's `hosts` in that table), or it is an
/// external service the snapshot declares ([`crate::egress::is_declared`]: a DNS endpoint's
/// name and port, or a static endpoint's address, or an address a declared name resolves to).
pub fn is_known(snapshot: &Snapshot, route_table: &str, target: &ConnectTarget) -> bool {
    let service_host = snapshot
        .route_table(route_table)
        .is_some_and(|t| t.names_host(&target.host));
    service_host || crate::egress::is_declared(snapshot, &target.host, target.port)
}

/// Why the egress policy refused a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressDenied;

/// The egress decision for `target` on the outbound listener named `listener`.
pub fn decide(
    snapshot: &Snapshot,
    listener: &str,
    target: &ConnectTarget,
) -> Result<(), EgressDenied> {
    let Some(proto) = snapshot
        .resources
        .listeners
        .iter()
        .flat_map(|set| &set.listeners)
        .find(|l| l.name == listener)
    else {
        // A draining listener no longer in the snapshot: the policy it was accepted under is
        // gone with it; refuse rather than guess.
        return Err(EgressDenied);
    };
    let Some(policy) = EgressPolicy::from_proto(proto.egress.as_ref()) else {
        return Ok(());
    };
    if !policy.deny_unknown
        || policy
            .allow_hosts
            .iter()
            .any(|p| host_matches(p, &target.host))
        || is_known(snapshot, &proto.route_table, target)
    {
        return Ok(());
    }
    Err(EgressDenied)
}

/// Serves a CONNECT request that arrived on `down.listener` (see the module docs). The egress
/// decision is made now, on `snapshot`; the returned future dials and answers.
pub fn serve(
    mut req: Request<Incoming>,
    snapshot: Option<&Snapshot>,
    down: Downstream,
    in_flight: InFlight,
    start: Instant,
) -> impl std::future::Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static
{
    let decided = admit(&req, snapshot, &down);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let downstream_h2 = req.version() == Version::HTTP_2;
    let info = RequestInfo {
        method: req.method().as_str().to_owned(),
        authority: authority_of(&req),
        path: String::new(),
    };
    drop(req);
    async move {
        let target = match decided {
            Ok(t) => t,
            Err(resp) => return Ok(*resp),
        };
        let (tcp, addr) = match dial(&target).await {
            Ok(ok) => ok,
            Err(DialError::TimedOut) => {
                tracing::debug!(%target, "CONNECT: connect timed out");
                let mut resp = local_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "connect-timeout",
                    &format!("connecting to {target} timed out after {CONNECT_TIMEOUT:?}"),
                );
                resp.headers_mut().insert(
                    crate::http::error::X_WEFT_TIMEOUT,
                    http::HeaderValue::from_static("connect"),
                );
                return Ok(resp);
            }
            Err(DialError::Failed(e)) => {
                tracing::debug!(%target, error = %e, "CONNECT: connect failed");
                return Ok(local_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connect-failed",
                    &format!("connecting to {target} failed: {e}"),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        let tunnel = Tunnel {
            upstream: Prefixed::new(ClientIo::Plain(tcp), Bytes::new()),
            upstream_addr: Some(addr),
            kind: TunnelKind::Connect,
            log: TunnelInfo {
                start,
                start_wall: SystemTime::now()
                    .checked_sub(start.elapsed())
                    .unwrap_or_else(SystemTime::now),
                answered_after: start.elapsed(),
                request: info,
                protocol: "TCP".to_owned(),
                status: 200,
                route: String::new(),
                cluster: String::new(),
                peer: down.peer.as_deref().map(|p| p.as_str().to_owned()),
            },
            listener: Arc::clone(&down.listener),
            _held: Held {
                _in_flight: in_flight,
                _active: None,
                _connection: None,
            },
        };
        hand_over(tunnel, &down, downstream_h2, on_upgrade);
        let mut resp = Response::new(ResponseBody::empty());
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    }
}

/// The synchronous part of [`serve`]: the target, if the listener and its egress policy let
/// the request through; else the answer.
fn admit<B>(
    req: &Request<B>,
    snapshot: Option<&Snapshot>,
    down: &Downstream,
) -> Result<ConnectTarget, Box<Response<ResponseBody>>> {
    if down.listener.direction != Direction::Outbound {
        return Err(Box::new(local_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "connect-not-allowed",
            "CONNECT is only served by the outbound listener (an egress tunnel)",
        )));
    }
    let target = ConnectTarget::of(req).map_err(|reason| {
        Box::new(local_error(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            &reason,
        ))
    })?;
    let decision = match snapshot {
        Some(s) => decide(s, &down.listener.name, &target),
        None => Err(EgressDenied),
    };
    if decision.is_err() {
        tunnel_metrics::get().egress_denied_connect().inc();
        tracing::debug!(%target, listener = %down.listener.name, "CONNECT denied by the egress policy");
        return Err(Box::new(local_error(
            StatusCode::FORBIDDEN,
            "egress-denied",
            &format!("CONNECT to {target} denied by the egress policy (unknown destination)"),
        )));
    }
    Ok(target)
}

#[derive(Debug)]
enum DialError {
    TimedOut,
    Failed(std::io::Error),
}

/// Resolves `target` and connects to its first address that accepts, within
/// [`CONNECT_TIMEOUT`].
async fn dial(target: &ConnectTarget) -> Result<(TcpStream, SocketAddr), DialError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match target.ip() {
            Some(ip) => vec![SocketAddr::new(ip, target.port)],
            None => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await?
                .take(MAX_ADDRESSES)
                .collect(),
        };
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} resolves to no address", target.host),
        );
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok((s, addr)),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(r) => r.map_err(DialError::Failed),
        Err(_) => Err(DialError::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, port: u16) -> ConnectTarget {
        ConnectTarget {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn targets_need_a_port() {
        let req = |uri: &str| {
            Request::builder()
                .method("CONNECT")
                .uri(uri)
                .body(())
                .unwrap()
        };
        assert_eq!(
            ConnectTarget::of(&req("API.Example.com:443")).unwrap(),
            target("api.example.com", 443)
        );
        let v6 = ConnectTarget::of(&req("[::1]:8080")).unwrap();
        assert_eq!(v6, target("::1", 8080));
        assert_eq!(v6.to_string(), "[::1]:8080");
        assert_eq!(v6.ip(), Some("::1".parse().unwrap()));
        assert!(ConnectTarget::of(&req("example.com")).is_err());
        assert!(ConnectTarget::of(&req("/path")).is_err());
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("api.example.com", "api.example.com"));
        assert!(host_matches("API.example.com", "api.example.com"));
        assert!(!host_matches("api.example.com", "x.api.example.com"));
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
        assert!(host_matches("10.1.2.3", "10.1.2.3"));
    }

    /// The snapshot fixture with `egress` on its outbound listener, a mesh service host name,
    /// a DNS-declared external service, a sidecar endpoint and the local app.
    fn snapshot(egress: Option<v1::EgressPolicy>) -> Snapshot {
        let mut r = crate::snapshot::tests::resources();
        let listeners = &mut r.listeners.as_mut().unwrap().listeners;
        listeners[0].egress = egress;
        listeners[1].direction = v1::Direction::Inbound.into();
        let route = &mut r.routes.as_mut().unwrap().tables[0].routes[0];
        route
            .r#match
            .as_mut()
            .unwrap()
            .hosts
            .push("backend.default.svc".into());
        r.clusters.as_mut().unwrap().clusters.push(v1::Cluster {
            name: "stripe.default".into(),
            dns_endpoints: vec![v1::DnsEndpoint {
                host: "api.stripe.com".into(),
                port: 443,
                weight: 1,
                refresh_ms: 30_000,
            }],
            ..Default::default()
        });
        let endpoints = &mut r.endpoints.as_mut().unwrap().clusters;
        endpoints.push(v1::ClusterEndpoints {
            cluster: "db.default".into(),
            endpoints: vec![v1::Endpoint {
                address: "10.0.0.7:15006".into(),
                weight: 1,
                proxy_id: "db-1".into(),
                identity: "spiffe://cluster.local/ns/default/sa/db".into(),
                ..Default::default()
            }],
        });
        endpoints.push(v1::ClusterEndpoints {
            cluster: "inbound".into(),
            endpoints: vec![v1::Endpoint {
                address: "127.0.0.1:8080".into(),
                weight: 1,
                ..Default::default()
            }],
        });
        Snapshot::build(r, None, &crate::metrics::Metrics::new().unwrap()).unwrap()
    }

    #[test]
    fn absent_or_permissive_policy_allows_everything() {
        let t = target("203.0.113.5", 22);
        assert_eq!(decide(&snapshot(None), "outbound", &t), Ok(()));
        let permissive = v1::EgressPolicy {
            deny_unknown: false,
            allow_hosts: vec![],
        };
        assert_eq!(decide(&snapshot(Some(permissive)), "outbound", &t), Ok(()));
        // A listener the snapshot does not have: refused.
        assert_eq!(decide(&snapshot(None), "gone", &t), Err(EgressDenied));
    }

    #[test]
    fn deny_unknown_allows_only_known_and_listed_destinations() {
        let r = snapshot(Some(v1::EgressPolicy {
            deny_unknown: true,
            allow_hosts: vec!["*.example.com".into(), "203.0.113.8".into()],
        }));
        let allowed = [
            target("backend", 7000),
            target("backend.default.svc", 80),
            // backend.default's static endpoint.
            target("127.0.0.1", 9001),
            target("api.stripe.com", 443),
            target("www.example.com", 443),
            target("203.0.113.8", 9),
        ];
        for t in &allowed {
            assert_eq!(decide(&r, "outbound", t), Ok(()), "{t}");
        }
        let denied = [
            target("203.0.113.5", 22),
            target("example.com", 443),
            // Another port of a static endpoint, a sidecar's inbound port, the local app.
            target("127.0.0.1", 9002),
            target("10.0.0.7", 15006),
            target("127.0.0.1", 8080),
            target("api.stripe.com", 80),
        ];
        for t in &denied {
            assert_eq!(decide(&r, "outbound", t), Err(EgressDenied), "{t}");
        }
    }
}
