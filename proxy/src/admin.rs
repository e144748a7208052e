//! The admin HTTP server (bootstrap `admin`, default 127.0.0.1:15000): `/metrics`, `/ready`,
//! `/live`, `/config_dump`, `/log_level`, `/app-health/`. It runs on the control thread's
//! runtime, never on the data path.
//!
//! The optional status listener (bootstrap `status`, off by default; injected pods use
//! 0.0.0.0:15020) is the same server restricted to [`Surface::Status`]: `/metrics`, `/ready`,
//! `/live` and `/app-health/` only, read-only, for the kubelet and Prometheus. What a proxy runs
//! (`/config_dump`) and changing its log level stay on the admin address, which then stays on
//! loopback.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use weft_proto::v1;

use crate::metrics::Metrics;
use crate::snapshot::{HeldEndpoints, ResourceKind, Snapshot, SnapshotStore};

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    /// The current snapshot.
    pub store: Arc<SnapshotStore>,
    /// Metrics to expose.
    pub metrics: Metrics,
    /// This proxy's identity.
    pub node: Arc<v1::Node>,
    /// Set once shutdown started: `/ready` turns 503.
    pub draining: Arc<AtomicBool>,
    /// At most this many admin connections open at once.
    pub limit: crate::conn_limit::ConnectionLimit,
    /// The control-plane connection (`/config_dump` `control_plane`).
    pub control_plane: Arc<crate::discovery::status::ControlPlaneStatus>,
}

/// Which paths a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything (the bootstrap `admin` address).
    Admin,
    /// `/metrics`, `/ready`, `/live`, `/app-health/` with GET or HEAD (the bootstrap `status`
    /// address).
    Status,
}

impl Surface {
    /// Whether this surface serves `path`.
    pub fn serves(self, path: &str) -> bool {
        match self {
            Surface::Admin => true,
            Surface::Status => {
                matches!(path, "/metrics" | "/ready" | "/live")
                    || path.starts_with(crate::app_health::PATH_PREFIX)
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Surface::Admin => "admin",
            Surface::Status => "status",
        }
    }
}

/// How long an admin client may take to send a request head (slowloris).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves admin requests on `listener` forever, the paths of `surface` only.
pub async fn serve(listener: TcpListener, state: AdminState, surface: Surface) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, listener = surface.name(), "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = state.limit.try_acquire("admin") else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let resp = if !surface.serves(req.uri().path()) {
                        text(
                            StatusCode::NOT_FOUND,
                            "not served on the status port; try /metrics /ready /live\n",
                        )
                    } else if req.uri().path() == "/log_level" {
                        log_level(req, peer).await
                    } else if req.uri().path().starts_with(crate::app_health::PATH_PREFIX)
                        && matches!(*req.method(), Method::GET | Method::HEAD)
                    {
                        // The app's kubelet probes (Kubernetes injection).
                        crate::app_health::answer(req.uri().path()).await
                    } else {
                        handle(&state, &req)
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `GET /log_level`: the filter in force. `PUT /log_level` (body: a filter such as `debug` or
/// `info,weft_proxy=trace`; empty = back to the start-up filter): loopback callers only, since
/// the admin port may be reachable from outside the pod for scraping.
async fn log_level(req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    match *req.method() {
        Method::GET | Method::HEAD => {
            text(StatusCode::OK, format!("{}\n", crate::log_level::current()))
        }
        Method::PUT | Method::POST => {
            if !peer.ip().is_loopback() {
                return text(
                    StatusCode::FORBIDDEN,
                    "the log level can only be changed from loopback\n",
                );
            }
            let body = match http_body_util::Limited::new(req.into_body(), 1024)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            match crate::log_level::set(&String::from_utf8_lossy(&body)) {
                Ok(filter) => text(StatusCode::OK, format!("{filter}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "use GET or PUT\n"),
    }
}

/// Answers one admin request.
pub fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.store.load().is_some() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no config from the control plane yet\n",
                )
            }
        }
        "/config_dump" => {
            let snapshot = state.store.load_full();
            let mut body = config_dump(&state.node, snapshot.as_deref());
            body["control_plane"] = state.control_plane.to_json();
            body["tunnel"] = crate::tunnel::dump();
            let mut r = text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics /ready /live /config_dump /log_level\n",
        ),
    }
}

/// Lower-case short name of a proto enum value: `DIRECTION_OUTBOUND` -> `outbound`.
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

fn node_json(n: &v1::Node) -> Value {
    json!({
        "id": n.id, "service": n.service, "namespace": n.namespace, "labels": n.labels,
        "inbound_address": n.inbound_address, "outbound_address": n.outbound_address,
        "app_address": n.app_address, "tcp_bind_ip": n.tcp_bind_ip,
        "build_version": n.build_version,
        "instance_ip": n.instance_ip, "app_ports": n.app_ports,
    })
}

/// The `/config_dump` document for `snapshot` (ARCHITECTURE.md "Admin APIs").
pub fn config_dump(node: &v1::Node, snapshot: Option<&Snapshot>) -> Value {
    let empty = Default::default();
    let r = snapshot.map_or(&empty, |s| &s.resources);
    let versions: serde_json::Map<String, Value> = ResourceKind::ALL
        .iter()
        .map(|k| {
            (
                k.as_str().to_owned(),
                r.version(*k).map_or(Value::Null, |v| json!(v)),
            )
        })
        .collect();
    let listeners: Vec<Value> = r.listeners.iter().flat_map(|s| &s.listeners).map(|l| {
        json!({
            "name": l.name, "address": l.address,
            "direction": enum_name(v1::Direction::try_from(l.direction).unwrap_or_default().as_str_name(), "DIRECTION_"),
            "protocol": enum_name(v1::ListenerProtocol::try_from(l.protocol).unwrap_or_default().as_str_name(), "LISTENER_PROTOCOL_"),
            "route_table": l.route_table, "cluster": l.cluster,
        })
    }).collect();
    // Held encoded (`HeldResources`): decoded for this dump only.
    let routes: Value = match r.routes() {
        Ok(set) => set.iter().flat_map(|s| &s.tables).map(|t| {
            json!({ "name": t.name, "routes": t.routes.iter().map(route_json).collect::<Vec<_>>() })
        }).collect(),
        Err(e) => json!({ "error": e.to_string() }),
    };
    let clusters: Vec<Value> = r.clusters.iter().flat_map(|s| &s.clusters).map(|c| {
        json!({
            "name": c.name, "service": c.service, "namespace": c.namespace,
            "lb": enum_name(v1::LbPolicy::try_from(c.lb).unwrap_or_default().as_str_name(), "LB_POLICY_"),
            "connect_timeout_ms": c.connect_timeout_ms, "request_timeout_ms": c.request_timeout_ms,
            "protocol": enum_name(v1::UpstreamProtocol::try_from(c.protocol).unwrap_or_default().as_str_name(), "UPSTREAM_PROTOCOL_"),
        })
    }).collect();
    // Held encoded per cluster (`HeldEndpoints`): decoded for this dump only.
    let endpoints: Value = match r.endpoints.as_deref().map(HeldEndpoints::decode).transpose() {
        Ok(set) => set.iter().flat_map(|s| &s.clusters).map(|ce| {
            json!({
                "cluster": ce.cluster,
                "endpoints": ce.endpoints.iter().map(|e| json!({
                    "address": e.address, "weight": e.weight, "proxy_id": e.proxy_id, "labels": e.labels,
                })).collect::<Vec<_>>(),
            })
        }).collect(),
        Err(e) => json!({ "error": e.to_string() }),
    };
    json!({
        "node": node_json(node),
        "versions": versions,
        "listeners": listeners,
        "routes": routes,
        "clusters": clusters,
        "endpoints": endpoints,
        "transparent": transparent_dump(snapshot),
    })
}

/// Transparent mode's part: captured listeners, VIPs, per-port destinations, app ports and
/// the mesh DNS server (`crate::transparent::dump`, `crate::dns::config_dump`).
fn transparent_dump(snapshot: Option<&Snapshot>) -> Value {
    let mut t = crate::transparent::dump::config_dump(snapshot);
    t["dns"] = crate::dns::config_dump(snapshot);
    t
}

fn route_json(r: &v1::Route) -> Value {
    let m = r.r#match.clone().unwrap_or_default();
    let path = match m.path.and_then(|p| p.kind) {
        None => Value::Null,
        Some(v1::path_match::Kind::Exact(p)) => json!({"exact": p}),
        Some(v1::path_match::Kind::Prefix(p)) => json!({"prefix": p}),
        Some(v1::path_match::Kind::Regex(p)) => json!({"regex": p}),
    };
    let headers: Vec<Value> = m
        .headers
        .iter()
        .map(|h| {
            let mut v = match &h.kind {
                Some(v1::header_match::Kind::Exact(x)) => json!({"name": h.name, "exact": x}),
                Some(v1::header_match::Kind::Regex(x)) => json!({"name": h.name, "regex": x}),
                Some(v1::header_match::Kind::Present(x)) => json!({"name": h.name, "present": x}),
                None => json!({"name": h.name}),
            };
            if h.invert {
                v["invert"] = json!(true);
            }
            v
        })
        .collect();
    json!({
        "name": r.name,
        "match": {"hosts": m.hosts, "path": path, "headers": headers, "methods": m.methods},
        "destinations": r.destinations.iter().map(|d| json!({"cluster": d.cluster, "weight": d.weight})).collect::<Vec<_>>(),
        "timeout_ms": r.timeout_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_surface_serves_probes_and_metrics_only() {
        for path in ["/metrics", "/ready", "/live", "/app-health/web/livez"] {
            assert!(Surface::Status.serves(path), "{path}");
            assert!(Surface::Admin.serves(path), "{path}");
        }
        for path in [
            "/config_dump",
            "/log_level",
            "/",
            "/metricsx",
            "/app-healthz",
        ] {
            assert!(!Surface::Status.serves(path), "{path}");
            assert!(Surface::Admin.serves(path), "{path}");
        }
    }

    #[test]
    fn config_dump_has_versions_node_and_resources() {
        let m = Metrics::new().unwrap();
        let s = Snapshot::build(crate::snapshot::tests::resources(), None, &m).unwrap();
        let node = v1::Node {
            id: "web-1".into(),
            service: "web".into(),
            ..Default::default()
        };
        let d = config_dump(&node, Some(&s));
        assert_eq!(d["node"]["id"], "web-1");
        assert_eq!(d["versions"]["listeners"], "l1");
        assert_eq!(d["versions"]["endpoints"], "e1");
        assert_eq!(d["listeners"][0]["protocol"], "http");
        assert_eq!(d["listeners"][0]["direction"], "outbound");
        assert_eq!(
            d["routes"][0]["routes"][0]["destinations"][0]["cluster"],
            "backend.default"
        );
        assert_eq!(d["clusters"][0]["protocol"], "unspecified");
        assert_eq!(
            d["endpoints"][0]["endpoints"][0]["address"],
            "127.0.0.1:9001"
        );
        let empty = config_dump(&node, None);
        assert_eq!(empty["versions"]["routes"], Value::Null);
        assert_eq!(empty["listeners"], json!([]));
        assert_eq!(empty["routes"], json!([]));
    }

    /// The route set is held encoded: the dump decodes it to exactly what was pushed.
    #[test]
    fn config_dump_shows_the_pushed_routes() {
        let mut r = crate::snapshot::tests::resources();
        let table = &mut r.routes.as_mut().unwrap().tables[0];
        let mut canary = table.routes[0].clone();
        canary.name = "canary".into();
        canary.timeout_ms = 2000;
        canary.r#match.as_mut().unwrap().headers = vec![v1::HeaderMatch {
            name: "x-canary".into(),
            kind: Some(v1::header_match::Kind::Exact("true".into())),
            ..Default::default()
        }];
        canary.r#match.as_mut().unwrap().path = Some(v1::PathMatch {
            kind: Some(v1::path_match::Kind::Prefix("/api".into())),
        });
        table.routes.insert(0, canary);
        let want: Vec<Value> = r.routes.as_ref().unwrap().tables.iter().map(|t| {
            json!({ "name": t.name, "routes": t.routes.iter().map(route_json).collect::<Vec<_>>() })
        }).collect();
        let s = Snapshot::build(r, None, &Metrics::new().unwrap()).unwrap();
        let d = config_dump(&v1::Node::default(), Some(&s));
        assert_eq!(d["routes"], Value::Array(want));
        assert_eq!(
            d["routes"][0]["routes"][0]["match"]["headers"][0]["name"],
            "x-canary"
        );
        assert_eq!(d["versions"]["routes"], "r1");
    }
}
