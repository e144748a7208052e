//! Per-request observability: access logs, trace propagation and span export, and the switch for
//! per-request metrics (bootstrap `observability:`, ARCHITECTURE.md).
//!
//! The request path calls two hooks (`pipeline.rs`): [`start`] when a request arrives and
//! [`attach`] when its response is ready; the [`Observation`] then rides in the response body
//! and is finished once, when the body ends, fails or is dropped. Everything is off by default,
//! and off costs one atomic load per request: [`start`] returns `None` without allocating.
//!
//! - [`trace_context`]: W3C `traceparent` parsing/formatting, ids, sampling.
//! - [`flags`]: response flags (UF, UT, UO, NR, RL, ...).
//! - [`access_log`]: line formats and the background writer.
//! - [`otlp`]: span records and the OTLP/gRPC batch exporter.
//! - [`config`]: the bootstrap section.
//!
//! Trace rules: with `tracing` configured, every hop that sees a valid `traceparent` makes a
//! span (inbound listener: SERVER, outbound: CLIENT) whose parent is the received parent-id, and
//! forwards `traceparent` with its own span id as parent-id, so the next hop's span is its
//! child. An inbound request without one starts a new sampled trace with probability
//! `sampling`. `tracestate` and B3 headers are never touched. Spans are exported when the trace
//! is sampled and `otlp_endpoint` is set.
//!
//! The installed [`Observability`] is process-wide (set once at start-up by `app::run`): the
//! request path reaches it without threading a handle through listeners and connections.

pub mod access_log;
pub mod config;
pub mod flags;
pub mod otlp;
pub mod trace_context;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Request, StatusCode, Version};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::http::body::ResponseBody;
use crate::metrics::MetricsError;
use crate::snapshot::{Direction, Listener};

pub use access_log::{AccessLogEntry, AccessLogSink};
pub use config::{AccessLogConfig, LogFormat, ObservabilityConfig, TracingConfig};
pub use flags::ResponseFlags;
pub use otlp::{SpanExporter, SpanKind, SpanRecord};
pub use trace_context::{SpanId, TraceId, TraceParent};

static INSTALLED: OnceLock<Observability> = OnceLock::new();
static REQUEST_METRICS: AtomicBool = AtomicBool::new(true);

/// `x-weft-peer-identity`, set on inbound requests by the authorization layer.
const PEER_IDENTITY: &str = "x-weft-peer-identity";
/// `tracestate`.
const TRACESTATE: &str = "tracestate";

/// Errors starting observability (at process start).
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The access log could not be opened.
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
    /// The span exporter could not be started.
    #[error(transparent)]
    Exporter(#[from] otlp::ExporterError),
    /// Metric registration failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// `observability.tracing.otlp_ca_file` could not be read.
    #[error("observability.tracing.otlp_ca_file {path:?}: {source}")]
    OtlpCa {
        /// The configured path.
        path: std::path::PathBuf,
        /// The read error.
        source: std::io::Error,
    },
}

/// Whether per-request metrics are recorded (`observability.metrics.requests`, default true).
/// `RequestMetrics::record` checks it: one relaxed load.
pub fn request_metrics_enabled() -> bool {
    REQUEST_METRICS.load(Ordering::Relaxed)
}

/// Turns per-request metrics on or off (process-wide).
pub fn set_request_metrics(on: bool) {
    REQUEST_METRICS.store(on, Ordering::Relaxed);
}

/// What a background writer (access log, span exporter) has been handed and has finished with
/// (written, exported or dropped), so that shutdown can wait for it ([`flush`]).
#[derive(Debug, Default)]
pub struct Progress {
    queued: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    /// The writer stopped (its output failed): nothing more will be done.
    stopped: AtomicBool,
}

impl Progress {
    /// One item queued.
    pub fn queued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` items finished with.
    pub fn done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Release);
    }

    /// The writer stopped for good.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Whether everything queued so far has been finished with (or never will be).
    pub fn caught_up(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
            || self.done.load(Ordering::Acquire) >= self.queued.load(Ordering::Relaxed)
    }
}

/// Waits (at most `limit`) until the installed access log and span exporter have written or
/// exported everything queued: at shutdown, after the listeners drained, so the last requests'
/// log lines and spans are not lost with the process. `true` if they caught up.
pub async fn flush(limit: std::time::Duration) -> bool {
    let Some(o) = INSTALLED.get() else {
        return true;
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if o.caught_up() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// What one TCP connection's access log line says.
#[derive(Debug)]
pub struct TcpConnectionLog<'a> {
    /// When the connection was accepted.
    pub start: std::time::SystemTime,
    /// Accept to close.
    pub duration: std::time::Duration,
    /// Why it did not get a plain upstream connection (RL, RBAC, UH, UF, UT = idle timeout,
    /// UC = ended with an error).
    pub flags: ResponseFlags,
    /// The endpoint connected to.
    pub upstream: Option<std::net::SocketAddr>,
    /// The listener's cluster.
    pub cluster: &'a str,
    /// The verified client identity (inbound mTLS).
    pub peer_identity: Option<&'a str>,
    /// Bytes read from the client.
    pub bytes_received: u64,
    /// Bytes written to the client.
    pub bytes_sent: u64,
    /// The authority the client asked for, when one is known: a captured TLS connection's SNI
    /// (transparent mode).
    pub authority: Option<&'a str>,
}

/// Writes the access log line of a TCP connection that ended, if the installed access log
/// covers `listener` (a lookup and nothing else when it does not).
pub fn log_tcp_connection(listener: &Listener, c: &TcpConnectionLog<'_>) {
    let Some(log) = INSTALLED.get().and_then(|o| o.inner.access_log.as_ref()) else {
        return;
    };
    if !log.applies_to(&listener.name) {
        return;
    }
    let entry = AccessLogEntry {
        start: c.start,
        listener: &listener.name,
        direction: listener.direction.as_str(),
        method: "",
        authority: c.authority.unwrap_or(""),
        path: "",
        protocol: "TCP",
        status: 0,
        flags: c.flags,
        duration: c.duration,
        response_duration: None,
        upstream: c.upstream,
        route: "",
        cluster: c.cluster,
        retries: 0,
        peer_identity: c.peer_identity,
        trace_id: None,
        bytes: Some((c.bytes_received, c.bytes_sent)),
    };
    log.sink.send(entry.format(log.format));
}

/// Makes `o` the process's observability; `false` if one was installed already (kept).
pub fn install(o: Observability) -> bool {
    INSTALLED.set(o).is_ok()
}

/// The metric families of this module.
#[derive(Debug, Clone)]
pub struct ObserveMetrics {
    /// `weft_access_log_dropped_total`.
    pub access_log_dropped: IntCounter,
    /// `weft_trace_spans_exported_total`.
    pub spans_exported: IntCounter,
    /// `weft_trace_spans_dropped_total{reason}`.
    pub spans_dropped: IntCounterVec,
}

impl ObserveMetrics {
    /// Creates and registers the families in `r`.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            name: &'static str,
            made: Result<C, prometheus::Error>,
        ) -> Result<C, MetricsError> {
            let c = made.map_err(|source| MetricsError::Register { name, source })?;
            r.register(Box::new(c.clone()))
                .map_err(|source| MetricsError::Register { name, source })?;
            Ok(c)
        }
        Ok(Self {
            access_log_dropped: reg(
                r,
                "weft_access_log_dropped_total",
                IntCounter::new(
                    "weft_access_log_dropped_total",
                    "Access log lines dropped because the writer fell behind",
                ),
            )?,
            spans_exported: reg(
                r,
                "weft_trace_spans_exported_total",
                IntCounter::new(
                    "weft_trace_spans_exported_total",
                    "Spans accepted by the OTLP collector",
                ),
            )?,
            spans_dropped: reg(
                r,
                "weft_trace_spans_dropped_total",
                IntCounterVec::new(
                    Opts::new(
                        "weft_trace_spans_dropped_total",
                        "Spans not exported: queue_full (exporter behind) or export_failed",
                    ),
                    &["reason"],
                ),
            )?,
        })
    }
}

/// Who this proxy is, for span resources.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// `node.service`.
    pub service: String,
    /// `node.namespace`.
    pub namespace: String,
    /// The node id.
    pub id: String,
}

#[derive(Debug)]
struct AccessLog {
    /// Listener names; empty = all.
    listeners: Box<[Box<str>]>,
    format: LogFormat,
    sink: AccessLogSink,
}

impl AccessLog {
    fn applies_to(&self, listener: &str) -> bool {
        self.listeners.is_empty() || self.listeners.iter().any(|l| &**l == listener)
    }
}

#[derive(Debug)]
struct Tracing {
    sampling: f64,
    exporter: Option<SpanExporter>,
}

#[derive(Debug, Default)]
struct Inner {
    access_log: Option<AccessLog>,
    tracing: Option<Tracing>,
}

/// The configured access log and tracer.
#[derive(Debug, Clone, Default)]
pub struct Observability {
    inner: Arc<Inner>,
}

impl Observability {
    /// Nothing observed.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Whether the access log and the span exporter have finished with everything queued.
    pub fn caught_up(&self) -> bool {
        self.inner
            .access_log
            .as_ref()
            .is_none_or(|a| a.sink.progress().caught_up())
            && self
                .inner
                .tracing
                .as_ref()
                .and_then(|t| t.exporter.as_ref())
                .is_none_or(|e| e.progress().caught_up())
    }

    /// Starts what `config` asks for (writer thread, exporter thread) and registers the
    /// metrics in `registry`. Also applies `metrics.requests`.
    pub fn start(
        config: &ObservabilityConfig,
        node: &NodeInfo,
        registry: &Registry,
    ) -> Result<Self, ObserveError> {
        let metrics = ObserveMetrics::new(registry)?;
        set_request_metrics(config.metrics.requests);
        let access_log = match &config.access_log {
            Some(c) => Some(AccessLog {
                listeners: c.listeners.iter().map(|l| l.as_str().into()).collect(),
                format: c.format,
                sink: AccessLogSink::start(c, metrics.access_log_dropped.clone())?,
            }),
            None => None,
        };
        let tracing = match &config.tracing {
            Some(t) => {
                let ca = match &t.otlp_ca_file {
                    Some(path) => Some(std::fs::read_to_string(path).map_err(|source| {
                        ObserveError::OtlpCa {
                            path: path.clone(),
                            source,
                        }
                    })?),
                    None => None,
                };
                let exporter = match &t.otlp_endpoint {
                    Some(url) => Some(SpanExporter::start(
                        url,
                        ca.as_deref(),
                        &otlp::ExporterIdentity {
                            service_name: t
                                .service_name
                                .clone()
                                .unwrap_or_else(|| node.service.clone()),
                            namespace: node.namespace.clone(),
                            instance: node.id.clone(),
                        },
                        otlp::ExporterMetrics {
                            exported: metrics.spans_exported.clone(),
                            dropped_queue_full: metrics
                                .spans_dropped
                                .with_label_values(&["queue_full"]),
                            dropped_export_failed: metrics
                                .spans_dropped
                                .with_label_values(&["export_failed"]),
                        },
                    )?),
                    None => None,
                };
                Some(Tracing {
                    sampling: t.sampling,
                    exporter,
                })
            }
            None => None,
        };
        Ok(Self::from_parts(access_log, tracing))
    }

    fn from_parts(access_log: Option<AccessLog>, tracing: Option<Tracing>) -> Self {
        Self {
            inner: Arc::new(Inner {
                access_log,
                tracing,
            }),
        }
    }

    /// Whether anything is observed at all.
    pub fn is_active(&self) -> bool {
        self.inner.access_log.is_some() || self.inner.tracing.is_some()
    }

    /// The per-request hook (see [`start`]): handles `traceparent` on `req` and returns the
    /// observation to finish, or `None` when there is nothing to log or export.
    pub fn observe<B>(
        &self,
        listener: &Arc<str>,
        direction: Direction,
        req: &mut Request<B>,
    ) -> Option<Observation> {
        let inner = &self.inner;
        let log = inner
            .access_log
            .as_ref()
            .is_some_and(|l| l.applies_to(listener));
        let mut span = None;
        let mut trace_id = None;
        match &inner.tracing {
            Some(t) => {
                let received = req
                    .headers()
                    .get(trace_context::TRACEPARENT)
                    .and_then(|v| TraceParent::parse(v.as_bytes()));
                let (context, parent) = match received {
                    Some(tp) => (Some(tp), Some(tp.parent_id)),
                    None if direction == Direction::Inbound
                        && trace_context::sample(t.sampling) =>
                    {
                        (Some(TraceParent::new_root(true)), None)
                    }
                    None => (None, None),
                };
                if let Some(context) = context {
                    let span_id = SpanId::random();
                    req.headers_mut().insert(
                        trace_context::TRACEPARENT,
                        context.child(span_id).to_header(),
                    );
                    trace_id = Some(context.trace_id);
                    if t.exporter.is_some() && context.sampled() {
                        span = Some(SpanContext {
                            trace_id: context.trace_id,
                            span_id,
                            parent,
                            flags: context.flags,
                            trace_state: req
                                .headers()
                                .get(TRACESTATE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned(),
                        });
                    }
                }
            }
            None if log => {
                trace_id = req
                    .headers()
                    .get(trace_context::TRACEPARENT)
                    .and_then(|v| TraceParent::parse(v.as_bytes()))
                    .map(|tp| tp.trace_id);
            }
            None => {}
        }
        if !log && span.is_none() {
            return None;
        }
        let note = UpstreamNote::default();
        note.data().inbound = direction == Direction::Inbound;
        req.extensions_mut().insert(note.clone());
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("")
            .to_owned();
        Some(Observation(Some(Box::new(Pending {
            owner: Arc::clone(&self.inner),
            listener: Arc::clone(listener),
            direction,
            start: Instant::now(),
            start_wall: SystemTime::now(),
            method: req.method().clone(),
            authority,
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
            version: req.version(),
            log,
            span,
            trace_id,
            note,
            status: None,
            response_at: None,
            flags: ResponseFlags::default(),
        }))))
    }
}

/// The request-path hook at arrival: `None` (nothing to do, no allocation) unless the installed
/// observability logs this listener or the request is traced. May rewrite `traceparent`.
pub fn start<B>(listener: &Listener, req: &mut Request<B>) -> Option<Observation> {
    INSTALLED
        .get()?
        .observe(&listener.name, listener.direction, req)
}

/// The request-path hook when the response is ready: records status and flags and moves the
/// observation into the body, which finishes it when it ends.
pub fn attach(mut observation: Observation, resp: &mut http::Response<ResponseBody>) {
    observation.on_response(resp.status(), resp.headers(), resp.body().is_local());
    resp.body_mut().observe(observation);
}

/// Where the request path notes what it did with an observed request (route, cluster, each
/// attempt's endpoint, the peer identity): a request extension present only on observed
/// requests, so noting an unobserved one costs an empty-extensions check.
#[derive(Debug, Clone, Default)]
pub struct UpstreamNote(Arc<Mutex<NoteData>>);

#[derive(Debug, Default)]
struct NoteData {
    inbound: bool,
    route: Option<Box<str>>,
    cluster: Option<Box<str>>,
    endpoint: Option<SocketAddr>,
    attempts: u32,
    peer_identity: Option<Box<str>>,
    /// Flags the request path set on its way (a fault delay: `DI`).
    flags: ResponseFlags,
}

impl UpstreamNote {
    fn data(&self) -> std::sync::MutexGuard<'_, NoteData> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes one attempt (the first or a retry) sent to `endpoint`.
    pub fn attempt(&self, endpoint: SocketAddr) {
        let mut n = self.data();
        n.endpoint = Some(endpoint);
        n.attempts = n.attempts.saturating_add(1);
    }
}

/// Notes that `req` was routed by `route` to `cluster` (pipeline).
pub fn note_route<B>(req: &Request<B>, route: &str, cluster: &str) {
    if let Some(note) = req.extensions().get::<UpstreamNote>() {
        let mut n = note.data();
        n.route = Some(route.into());
        n.cluster = Some(cluster.into());
    }
}

/// Adds `flags` to what the access log and span of `req` report (route filters: a fault delay).
pub fn note_flags<B>(req: &Request<B>, flags: ResponseFlags) {
    if let Some(note) = req.extensions().get::<UpstreamNote>() {
        note.data().flags.insert(flags);
    }
}

/// The note of an observed request about to be sent upstream (`None`: not observed), for the
/// attempt loop to call [`UpstreamNote::attempt`] on. Inbound, it also takes the verified peer
/// identity the authorization layer put in `x-weft-peer-identity` by then.
pub fn note_of<B>(req: &Request<B>) -> Option<UpstreamNote> {
    note_in(req.extensions(), req.headers())
}

/// [`note_of`] for a request taken apart (its head's extensions and header fields).
pub fn note_in(extensions: &http::Extensions, headers: &http::HeaderMap) -> Option<UpstreamNote> {
    let note = extensions.get::<UpstreamNote>()?;
    let mut n = note.data();
    if n.inbound {
        n.peer_identity = headers
            .get(PEER_IDENTITY)
            .and_then(|v| v.to_str().ok())
            .map(Into::into);
    }
    drop(n);
    Some(note.clone())
}

/// The trace context of a span this hop records.
#[derive(Debug)]
struct SpanContext {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    flags: u8,
    trace_state: String,
}

#[derive(Debug)]
struct Pending {
    owner: Arc<Inner>,
    listener: Arc<str>,
    direction: Direction,
    start: Instant,
    start_wall: SystemTime,
    method: http::Method,
    authority: String,
    path: String,
    version: Version,
    log: bool,
    span: Option<SpanContext>,
    trace_id: Option<TraceId>,
    note: UpstreamNote,
    status: Option<StatusCode>,
    response_at: Option<Instant>,
    flags: ResponseFlags,
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Sent to the end.
    Complete,
    /// The upstream body failed mid-stream (UC).
    UpstreamError,
    /// Dropped before its end: the downstream went away (DC).
    Abandoned,
}

/// One observed request, finished exactly once: by [`Observation::end`], or when dropped (the
/// request was abandoned before a response: DC).
#[derive(Debug)]
pub struct Observation(Option<Box<Pending>>);

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

impl Observation {
    /// Records the response head: status, the time to it and, for a response the proxy
    /// generated itself (`local`), the flags its error headers imply.
    pub fn on_response(&mut self, status: StatusCode, headers: &HeaderMap, local: bool) {
        if let Some(p) = &mut self.0 {
            p.status = Some(status);
            p.response_at = Some(Instant::now());
            if local {
                p.flags
                    .insert(ResponseFlags::from_local_response(status, headers));
            }
        }
    }

    /// Finishes the request: writes the access log line and queues the span.
    pub fn end(mut self, how: BodyEnd) {
        if let Some(p) = self.0.take() {
            finish(*p, how);
        }
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            finish(*p, BodyEnd::Abandoned);
        }
    }
}

fn finish(mut p: Pending, how: BodyEnd) {
    let duration = p.start.elapsed();
    match how {
        BodyEnd::Complete => {}
        BodyEnd::UpstreamError => p
            .flags
            .insert(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION),
        BodyEnd::Abandoned => p.flags.insert(ResponseFlags::DOWNSTREAM_DISCONNECT),
    }
    let note = std::mem::take(&mut *p.note.data());
    p.flags.insert(note.flags);
    let status = p.status.map_or(0, |s| s.as_u16());
    if p.log {
        if let Some(log) = &p.owner.access_log {
            let entry = AccessLogEntry {
                start: p.start_wall,
                listener: &p.listener,
                direction: p.direction.as_str(),
                method: p.method.as_str(),
                authority: &p.authority,
                path: &p.path,
                protocol: protocol(p.version),
                status,
                flags: p.flags,
                duration,
                response_duration: p.response_at.map(|t| t.duration_since(p.start)),
                upstream: note.endpoint,
                route: note.route.as_deref().unwrap_or(""),
                cluster: note.cluster.as_deref().unwrap_or(""),
                retries: note.attempts.saturating_sub(1),
                peer_identity: note.peer_identity.as_deref(),
                trace_id: p.trace_id,
                bytes: None,
            };
            log.sink.send(entry.format(log.format));
        }
    }
    if let Some(ctx) = p.span.take() {
        let exporter = p.owner.tracing.as_ref().and_then(|t| t.exporter.as_ref());
        if let Some(exporter) = exporter {
            exporter.export(span_record(&p, ctx, &note, status, duration));
        }
    }
}

fn span_record(
    p: &Pending,
    ctx: SpanContext,
    note: &NoteData,
    status: u16,
    duration: Duration,
) -> SpanRecord {
    use otlp::AttrValue::{Int, Str};
    let kind = match p.direction {
        Direction::Inbound => SpanKind::Server,
        Direction::Outbound => SpanKind::Client,
    };
    let route = note.route.as_deref().unwrap_or("");
    let name = if route.is_empty() {
        p.method.as_str().to_owned()
    } else {
        format!("{} {route}", p.method)
    };
    let path = p.path.split('?').next().unwrap_or("");
    let mut attributes = vec![
        ("http.request.method", Str(p.method.as_str().to_owned())),
        ("url.path", Str(path.to_owned())),
        ("http.response.status_code", Int(i64::from(status))),
        ("server.address", Str(p.authority.clone())),
        ("network.protocol.name", Str("http".into())),
        ("weft.listener", Str(p.listener.to_string())),
        ("weft.route", Str(route.to_owned())),
        (
            "weft.cluster",
            Str(note.cluster.as_deref().unwrap_or("").to_owned()),
        ),
        (
            "weft.retries",
            Int(i64::from(note.attempts.saturating_sub(1))),
        ),
    ];
    if let Some(ep) = note.endpoint {
        attributes.push(("weft.upstream.address", Str(ep.to_string())));
    }
    if let Some(peer) = &note.peer_identity {
        attributes.push(("weft.peer.identity", Str(peer.to_string())));
    }
    if !p.flags.is_empty() {
        attributes.push(("weft.response_flags", Str(p.flags.to_string())));
    }
    // Semantic conventions: a server span is an error on 5xx, a client span on 4xx too.
    let error = !p.flags.is_empty()
        || status == 0
        || status >= 500
        || (kind == SpanKind::Client && status >= 400);
    SpanRecord {
        trace_id: ctx.trace_id,
        span_id: ctx.span_id,
        parent_id: ctx.parent,
        flags: ctx.flags,
        trace_state: ctx.trace_state,
        kind,
        name,
        start: p.start_wall,
        end: p.start_wall + duration,
        attributes,
        error,
    }
}

#[cfg(test)]
mod tests;
