//! The admin HTTP API (hyper 1, HTTP/1.1): policy CRUD for `weftctl`, proxy status, metrics.
//!
//! Routes are listed in ARCHITECTURE.md "Admin APIs". Bodies are JSON except `/healthz` and
//! `/metrics` (text). Served over TLS with the CA's server certificate unless
//! `--insecure-admin`; who may call what is [`auth`]'s decision, made per request before
//! anything is read. Connections are capped ([`crate::tls::ConnectionSlots`]) and a request head
//! must arrive within [`HEADER_READ_TIMEOUT`].

pub mod auth;
pub mod readyz;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use self::auth::{AdminAuth, Denied, Principal};
use crate::policy::StoreError;
use crate::state::{ApplyError, ControlPlane};
use crate::tls::ConnectionSlots;

/// Largest accepted request body (a policy file, or a batch of them).
const MAX_BODY: usize = crate::policy::MAX_REQUEST_BYTES;

/// How long a client may take to send a request head (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;

/// How the admin server is protected.
#[derive(Clone)]
pub struct AdminServer {
    /// TLS (`None`: plaintext, `--insecure-admin`).
    pub tls: Option<TlsAcceptor>,
    pub auth: Arc<AdminAuth>,
    pub slots: ConnectionSlots,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth)
            .field("slots", &self.slots)
            .finish()
    }
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    cp: Arc<ControlPlane>,
    server: AdminServer,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = server.slots.try_take(peer) else {
                    continue;
                };
                let cp = Arc::clone(&cp);
                let server = server.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match &server.tls {
                        None => serve_connection(stream, cp, server.auth, None, peer).await,
                        Some(acceptor) => {
                            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => tls,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "admin TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "admin TLS handshake timed out");
                                    return;
                                }
                            };
                            let leaf = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.to_vec());
                            let cert = server.auth.principal_from_cert(leaf.as_deref());
                            serve_connection(tls, cp, server.auth, cert, peer).await;
                        }
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
}

async fn serve_connection<S>(
    stream: S,
    cp: Arc<ControlPlane>,
    auth: Arc<AdminAuth>,
    cert: Option<Principal>,
    peer: std::net::SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cert = cert.map(Arc::new);
    let service = service_fn(move |req| {
        let (cp, auth, cert) = (Arc::clone(&cp), Arc::clone(&auth), cert.clone());
        async move { Ok::<_, Infallible>(handle(&cp, &auth, cert.as_deref(), peer, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "admin connection error");
    }
}

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    response(status, "application/json", body)
}

fn errors_response(status: StatusCode, errors: &[String]) -> Response<Body> {
    json_response(status, &json!({ "errors": errors }))
}

/// How much of an oversized body is read (and dropped) before answering 413, so a client that
/// is still sending reads the answer instead of a broken pipe; beyond it the connection closes.
const MAX_DRAIN: usize = 64 << 20;

/// How long draining an oversized body may take.
const DRAIN_TIME: Duration = Duration::from_secs(10);

async fn read_body(req: Request<Incoming>) -> Result<String, Response<Body>> {
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    let too_large = loop {
        match body.frame().await {
            None => break false,
            Some(Err(e)) => {
                return Err(errors_response(
                    StatusCode::BAD_REQUEST,
                    &[format!("reading the request body: {e}")],
                ))
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > MAX_BODY {
                        break true;
                    }
                    bytes.extend_from_slice(&data);
                }
            }
        }
    };
    if too_large {
        drop(bytes);
        let drain = async {
            let mut drained = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                drained += frame.data_ref().map_or(0, Bytes::len);
                if drained > MAX_DRAIN {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        let mut r = errors_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &[format!("the request body is larger than {MAX_BODY} bytes")],
        );
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return Err(r);
    }
    String::from_utf8(bytes).map_err(|_| {
        errors_response(
            StatusCode::BAD_REQUEST,
            &["the body must be UTF-8 YAML".to_owned()],
        )
    })
}

fn denied_response(denied: &Denied) -> Response<Body> {
    match denied {
        Denied::Unauthenticated(m) => {
            let mut r = errors_response(StatusCode::UNAUTHORIZED, std::slice::from_ref(m));
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"weft-control\""),
            );
            r
        }
        Denied::Forbidden(m) => errors_response(StatusCode::FORBIDDEN, std::slice::from_ref(m)),
    }
}

async fn handle(
    cp: &ControlPlane,
    auth: &AdminAuth,
    cert: Option<&Principal>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Readiness, like /healthz, needs no credential (the kubelet's probe has none).
    if path == "/readyz" {
        if method != Method::GET && method != Method::HEAD {
            return method_not_allowed("GET");
        }
        let reasons = readyz::not_ready(cp);
        return if reasons.is_empty() {
            response(StatusCode::OK, "text/plain", "ready\n")
        } else {
            response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", reasons.join("; ")),
            )
        };
    }
    let principal = match auth.check(
        &method,
        &path,
        cert,
        req.headers().get(header::AUTHORIZATION),
    ) {
        Ok(p) => p,
        Err(denied) => {
            cp.metrics()
                .admin_requests_denied_total
                .with_label_values(&[denied.reason()])
                .inc();
            tracing::warn!(%peer, %method, %path, reason = denied.reason(), "admin request refused: {}", denied.message());
            return denied_response(&denied);
        }
    };
    let mutating = auth::required_role(&method, &path) == Some(auth::Role::Write);
    let result = route(cp, req, &method, &path).await;
    let status = result.status().as_u16();
    if mutating {
        let who = principal.as_ref().map_or_else(
            || "anonymous (--insecure-admin)".to_owned(),
            ToString::to_string,
        );
        tracing::info!(target: "weft::audit", %peer, who = %who, %method, %path, status, "admin change");
    } else {
        tracing::debug!(%method, %path, status, "admin request");
    }
    result
}

async fn route(
    cp: &ControlPlane,
    req: Request<Incoming>,
    method: &Method,
    path: &str,
) -> Response<Body> {
    // Extension: several files at once (weftctl apply/validate -f DIR).
    if (path == "/v1/policies" && *method == Method::PUT) || path == "/v1/validate" {
        if *method != Method::PUT && *method != Method::POST {
            return method_not_allowed("POST");
        }
        let dry_run = path == "/v1/validate";
        return match read_batch(req).await {
            Ok(changes) => outcome_response(cp.apply_many(&changes, dry_run).await),
            Err(r) => r,
        };
    }
    // What applying these files would change, per connected proxy (weftctl diff).
    if path == "/v1/diff" {
        if *method != Method::POST {
            return method_not_allowed("POST");
        }
        return match read_batch(req).await {
            Ok(changes) => match cp.diff_many(&changes).await {
                Ok(diff) => json_response(StatusCode::OK, &json!(diff)),
                Err(e) => outcome_response(Err(e)),
            },
            Err(r) => r,
        };
    }
    if let Some(name) = path.strip_prefix("/v1/policies/") {
        return match *method {
            Method::PUT => match read_body(req).await {
                Ok(body) => apply(cp, name, Some(&body), false).await,
                Err(r) => r,
            },
            Method::DELETE => apply(cp, name, None, false).await,
            _ => method_not_allowed("PUT, DELETE"),
        };
    }
    // weftctl log-level: the filter pushed to one proxy ("" = its own).
    if let Some(id) = path
        .strip_prefix("/v1/proxies/")
        .and_then(|rest| rest.strip_suffix("/log-level"))
    {
        if *method != Method::PUT {
            return method_not_allowed("PUT");
        }
        return match read_body(req).await {
            Ok(level) => match cp.set_log_level(id, level.trim()).await {
                Ok(()) => json_response(
                    StatusCode::OK,
                    &json!({"proxy": id, "log_level": level.trim()}),
                ),
                Err(e @ crate::state::LogLevelError::NoSuchProxy(_)) => {
                    errors_response(StatusCode::NOT_FOUND, &[e.to_string()])
                }
                Err(crate::state::LogLevelError::Store(e)) => {
                    outcome_response(Err(ApplyError::Store(e)))
                }
                Err(e) => errors_response(StatusCode::BAD_REQUEST, &[e.to_string()]),
            },
            Err(r) => r,
        };
    }
    if let Some(name) = path.strip_prefix("/v1/validate/") {
        return match *method {
            Method::POST => match read_body(req).await {
                Ok(body) => apply(cp, name, Some(&body), true).await,
                Err(r) => r,
            },
            _ => method_not_allowed("POST"),
        };
    }
    let known = matches!(
        path,
        "/healthz"
            | "/metrics"
            | "/v1/policies"
            | "/v1/services"
            | "/v1/routes"
            | "/v1/clusters"
            | "/v1/endpoints"
            | "/v1/proxies"
    );
    if !known {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("no such endpoint: {path}") }),
        );
    }
    if *method != Method::GET && *method != Method::HEAD {
        return method_not_allowed("GET");
    }
    match path {
        "/healthz" => response(StatusCode::OK, "text/plain", "ok\n"),
        "/metrics" => match cp.metrics().render() {
            Ok(text) => response(StatusCode::OK, "text/plain; version=0.0.4", text),
            Err(e) => response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        "/v1/policies" => {
            let policy = cp.policy();
            json_response(
                StatusCode::OK,
                &json!({
                    "version": policy.version(),
                    "revision": cp.policy_revision(),
                    "files": policy.files(),
                    "error": cp.policy_error(),
                }),
            )
        }
        "/v1/services" => json_response(StatusCode::OK, &json!(cp.policy().services())),
        "/v1/routes" => json_response(StatusCode::OK, &json!(cp.policy().routes())),
        "/v1/clusters" => {
            let policy = cp.policy();
            let clusters = cp.with_registry(|r| crate::inventory::clusters(&policy, r));
            json_response(StatusCode::OK, &json!(clusters))
        }
        "/v1/endpoints" => {
            let policy = cp.policy();
            let endpoints = cp.with_registry(|r| crate::inventory::endpoints(&policy, r));
            json_response(StatusCode::OK, &json!(endpoints))
        }
        _ => json_response(StatusCode::OK, &json!(cp.proxy_statuses())),
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({ "error": format!("method not allowed (allowed: {allow})") }),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

/// Body of the multi-file endpoints.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    files: Vec<crate::policy::SourceFile>,
}

/// Reads a multi-file body into store changes.
async fn read_batch(
    req: Request<Incoming>,
) -> Result<Vec<(String, Option<String>)>, Response<Body>> {
    let body = read_body(req).await?;
    let batch = serde_json::from_str::<Batch>(&body).map_err(|e| {
        errors_response(
            StatusCode::BAD_REQUEST,
            &[format!(
                "expected JSON {{\"files\": [{{\"name\", \"content\"}}]}}: {e}"
            )],
        )
    })?;
    Ok(batch
        .files
        .into_iter()
        .map(|f| (f.name, Some(f.content)))
        .collect())
}

async fn apply(
    cp: &ControlPlane,
    name: &str,
    content: Option<&str>,
    dry_run: bool,
) -> Response<Body> {
    outcome_response(cp.apply(name, content, dry_run).await)
}

fn outcome_response(result: Result<crate::state::ApplyOutcome, ApplyError>) -> Response<Body> {
    match result {
        Ok(outcome) => json_response(StatusCode::OK, &json!(outcome)),
        Err(ApplyError::Invalid(errors)) => {
            errors_response(StatusCode::UNPROCESSABLE_ENTITY, &errors.messages())
        }
        Err(ApplyError::Store(e @ StoreError::InvalidName(_))) => {
            errors_response(StatusCode::BAD_REQUEST, &[e.to_string()])
        }
        Err(ApplyError::Store(e @ StoreError::NotFound(_))) => {
            errors_response(StatusCode::NOT_FOUND, &[e.to_string()])
        }
        // Another apply (through this replica or another) won the compare-and-swap.
        Err(ApplyError::Store(e @ StoreError::Conflict { base, current })) => json_response(
            StatusCode::CONFLICT,
            &json!({"errors": [e.to_string()], "revision": current, "base_revision": base}),
        ),
        Err(ApplyError::Store(e @ StoreError::Unavailable { .. })) => {
            tracing::error!(error = %e, "policy store");
            errors_response(StatusCode::SERVICE_UNAVAILABLE, &[e.to_string()])
        }
        Err(ApplyError::Store(e)) => {
            tracing::error!(error = %e, "policy store");
            errors_response(StatusCode::INTERNAL_SERVER_ERROR, &[e.to_string()])
        }
    }
}
