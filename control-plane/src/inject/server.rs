//! The webhook's HTTPS server (`--inject-addr`): `POST /inject` (an AdmissionReview, answered
//! by [`super::review`]) and `GET /healthz`; anything else is 404 / 405.
//!
//! TLS with the certificate and key of `--inject-tls-cert` / `--inject-tls-key` (a
//! `kubernetes.io/tls` Secret's `tls.crt` / `tls.key`): checked at every handshake and re-read
//! when either file changed, so a rotated Secret is served from the next connection; a broken
//! pair keeps the previous one (logged). HTTP/1.1 and HTTP/2 (ALPN), at most 256 connections, a
//! request head within 10 s, a body of at most 8 MiB (413 beyond; the API server sends at most
//! about 3 MiB). The config file is re-read when it changes ([`super::config::ConfigFile`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::config::{ConfigError, ConfigFile, FileStamp};
use super::pod::Injector;
use super::review::{self, FailurePolicy};
use super::InjectMetrics;
use crate::state::ControlPlane;
use crate::tls::ConnectionSlots;

/// Largest request body read.
pub const MAX_BODY: usize = 8 << 20;

/// How long a client may take to send a request head, and to finish its TLS handshake.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Most open webhook connections.
const MAX_CONNECTIONS: usize = 256;

/// `--inject-*`.
#[derive(Debug, Clone)]
pub struct InjectSettings {
    pub addr: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub config: PathBuf,
    pub failure_policy: FailurePolicy,
}

/// Errors starting the webhook.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--inject-tls-cert {cert} / --inject-tls-key {key}: {reason}")]
    Tls {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("binding the injection webhook on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("registering weft_inject_requests_total: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Reads a certificate chain and its key into a rustls key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let cert_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: no private key in it ({e})", key.display()))?;
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
    Ok(certified)
}

/// The serving certificate, re-read when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    stamps: Mutex<(Option<FileStamp>, Option<FileStamp>)>,
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, InjectError> {
        let stamps = (FileStamp::of(cert), FileStamp::of(key));
        let certified = load_certified_key(cert, key).map_err(|reason| InjectError::Tls {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            reason,
        })?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(certified),
            stamps: Mutex::new(stamps),
        })
    }

    fn refresh(&self) {
        let mut last = self
            .stamps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = (FileStamp::of(&self.cert), FileStamp::of(&self.key));
        if now == *last || now.0.is_none() || now.1.is_none() {
            return;
        }
        match load_certified_key(&self.cert, &self.key) {
            Ok(certified) => {
                tracing::info!(cert = %self.cert.display(), "injection webhook certificate reloaded");
                self.current.store(Arc::new(certified));
                *last = now;
            }
            // A Secret update swaps both files at once; a half-written pair (or a key not yet
            // matching) is retried at the next handshake.
            Err(e) => tracing::warn!(
                "injection webhook certificate not reloaded (keeping the previous one): {e}"
            ),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(self.current.load_full())
    }
}

/// The webhook, bound.
pub struct InjectServer {
    listener: TcpListener,
    state: Arc<State>,
    acceptor: TlsAcceptor,
}

#[derive(Debug)]
struct State {
    cp: Arc<ControlPlane>,
    config: ConfigFile,
    failure_policy: FailurePolicy,
    metrics: InjectMetrics,
    slots: ConnectionSlots,
}

impl std::fmt::Debug for InjectServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InjectServer")
            .field("listener", &self.listener)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl InjectServer {
    /// Loads the config and the certificate (either unusable: an error naming the file) and
    /// binds `settings.addr`.
    pub async fn bind(
        settings: &InjectSettings,
        cp: Arc<ControlPlane>,
    ) -> Result<Self, InjectError> {
        let config = ConfigFile::load(&settings.config)?;
        let cert = Arc::new(ReloadingCert::load(&settings.tls_cert, &settings.tls_key)?);
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| InjectError::Tls {
                cert: settings.tls_cert.display().to_string(),
                key: settings.tls_key.display().to_string(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(cert);
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener =
            TcpListener::bind(settings.addr)
                .await
                .map_err(|source| InjectError::Bind {
                    addr: settings.addr,
                    source,
                })?;
        let metrics = InjectMetrics::register(cp.metrics())?;
        let refused = cp
            .metrics()
            .connections_refused_total
            .with_label_values(&["inject"]);
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                cp,
                config,
                failure_policy: settings.failure_policy,
                metrics,
                slots: ConnectionSlots::new("inject", MAX_CONNECTIONS, refused),
            }),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) {
        let Self {
            listener,
            state,
            acceptor,
        } = self;
        tracing::info!(
            addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            failure_policy = ?state.failure_policy,
            "injection webhook listening"
        );
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "injection webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let Some(slot) = state.slots.try_take(peer) else {
                continue;
            };
            let (state, acceptor) = (Arc::clone(&state), acceptor.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let tls = match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "injection webhook TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "injection webhook TLS handshake timed out");
                        return;
                    }
                };
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(handle(&state, req).await) }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT);
                if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                    tracing::debug!(%peer, "injection webhook connection: {e}");
                }
            });
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = json!({ "error": message }).to_string() + "\n";
    reply(status, "application/json", body)
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::POST, "/inject") => inject(state, req).await,
        (_, "/healthz") => error(StatusCode::METHOD_NOT_ALLOWED, "use GET /healthz"),
        (_, "/inject") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST /inject"),
        (_, path) => error(
            StatusCode::NOT_FOUND,
            &format!("no such endpoint: {path} (POST /inject, GET /healthz)"),
        ),
    }
}

async fn inject(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            state.metrics.count("malformed");
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return if too_large {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the AdmissionReview is larger than {MAX_BODY} bytes"),
                )
            } else {
                error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}"))
            };
        }
    };
    let config = state.config.current();
    let roots = state.cp.trust().roots_pem.concat();
    let injector = Injector {
        config: &config,
        control_plane_ca: &roots,
        version: env!("CARGO_PKG_VERSION"),
    };
    // The pure function is microseconds of CPU: no blocking-pool hop.
    match review::answer(&body, &injector, state.failure_policy) {
        Ok(answer) => {
            state.metrics.count(answer.result);
            match answer.result {
                "error" | "refused" => tracing::warn!(result = answer.result, "{}", answer.summary),
                _ => tracing::info!(result = answer.result, "{}", answer.summary),
            }
            let mut body = serde_json::to_vec(&answer.body).unwrap_or_default();
            body.push(b'\n');
            reply(StatusCode::OK, "application/json", body)
        }
        Err(malformed) => {
            state.metrics.count("malformed");
            tracing::warn!("injection webhook: {malformed}");
            error(StatusCode::BAD_REQUEST, &malformed.to_string())
        }
    }
}
