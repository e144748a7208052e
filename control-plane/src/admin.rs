//! The admin HTTP API (hyper 1, HTTP/1.1): policy CRUD for `weftctl`, proxy status, metrics.
//!
//! Routes are listed in ARCHITECTURE.md "Admin APIs". Bodies are JSON except `/healthz` and
//! `/metrics` (text).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::policy::StoreError;
use crate::state::{ApplyError, ControlPlane};

/// Largest accepted request body (a policy file).
const MAX_BODY: usize = 4 << 20;

type Body = Full<Bytes>;

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    cp: Arc<ControlPlane>,
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
                let cp = Arc::clone(&cp);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let cp = Arc::clone(&cp);
                        async move { Ok::<_, Infallible>(handle(&cp, req).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "admin connection error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
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

async fn read_body(req: Request<Incoming>) -> Result<String, Response<Body>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            errors_response(
                StatusCode::BAD_REQUEST,
                &[format!("reading the request body: {e}")],
            )
        })?
        .to_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        errors_response(
            StatusCode::BAD_REQUEST,
            &["the body must be UTF-8 YAML".to_owned()],
        )
    })
}

async fn handle(cp: &ControlPlane, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let result = route(cp, req, &method, &path).await;
    tracing::debug!(%method, %path, status = result.status().as_u16(), "admin request");
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
        Err(ApplyError::Store(e)) => {
            tracing::error!(error = %e, "policy store");
            errors_response(StatusCode::INTERNAL_SERVER_ERROR, &[e.to_string()])
        }
    }
}
