//! Span export over OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`,
//! protos vendored in `weft-proto`). The request path hands finished spans to a bounded queue
//! (`try_send`, never blocking; a full queue drops and counts); a background thread with its own
//! small runtime exports what was queued every [`BATCH_INTERVAL`], [`BATCH_SPANS`] per call.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use tokio::sync::mpsc;
use weft_proto::otlp::collector::trace::v1::trace_service_client::TraceServiceClient;
use weft_proto::otlp::collector::trace::v1::ExportTraceServiceRequest;
use weft_proto::otlp::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use weft_proto::otlp::resource::v1::Resource;
use weft_proto::otlp::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};

use super::trace_context::{SpanId, TraceId};

/// Spans that may wait for export before new ones are dropped.
pub const QUEUE_SPANS: usize = 8192;
/// The most spans in one Export call.
pub const BATCH_SPANS: usize = 512;
/// How often queued spans are exported (up to [`BATCH_SPANS`] per call, one call after another
/// while more are queued).
pub const BATCH_INTERVAL: Duration = Duration::from_millis(200);
/// Deadline of one Export call (and of connecting to the collector).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which side of a hop a span describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The inbound sidecar receiving a request for its app.
    Server,
    /// The outbound sidecar sending the app's request on.
    Client,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// The trace.
    pub trace_id: TraceId,
    /// This span.
    pub span_id: SpanId,
    /// The span of the previous hop (`None`: a root this proxy started).
    pub parent_id: Option<SpanId>,
    /// W3C trace flags.
    pub flags: u8,
    /// The request's `tracestate`, as received.
    pub trace_state: String,
    /// Server or client.
    pub kind: SpanKind,
    /// e.g. `GET default-backend.default`.
    pub name: String,
    /// When the request arrived.
    pub start: SystemTime,
    /// When the response ended.
    pub end: SystemTime,
    /// Semantic-convention and `weft.*` attributes.
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// Whether the span's status is ERROR.
    pub error: bool,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn key_value(key: &str, value: AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s),
        AttrValue::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

impl SpanRecord {
    /// The OTLP span.
    pub fn into_proto(self) -> Span {
        Span {
            trace_id: self.trace_id.0.to_vec(),
            span_id: self.span_id.0.to_vec(),
            trace_state: self.trace_state,
            parent_span_id: self.parent_id.map(|p| p.0.to_vec()).unwrap_or_default(),
            // Low byte: W3C trace flags; bit 8: "has is-remote" with is-remote (bit 9) set when
            // the parent came from another process (always, for a proxy hop with a parent).
            flags: u32::from(self.flags) | 0x100 | if self.parent_id.is_some() { 0x200 } else { 0 },
            name: self.name,
            kind: match self.kind {
                SpanKind::Server => span::SpanKind::Server,
                SpanKind::Client => span::SpanKind::Client,
            }
            .into(),
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(self.end),
            attributes: self
                .attributes
                .into_iter()
                .map(|(k, v)| key_value(k, v))
                .collect(),
            status: Some(Status {
                message: String::new(),
                code: if self.error {
                    status::StatusCode::Error
                } else {
                    status::StatusCode::Unset
                }
                .into(),
            }),
            ..Default::default()
        }
    }
}

/// Who exports: the OTLP resource attributes.
#[derive(Debug, Clone)]
pub struct ExporterIdentity {
    /// `service.name`.
    pub service_name: String,
    /// `service.namespace`.
    pub namespace: String,
    /// `service.instance.id` (the node id).
    pub instance: String,
}

/// Counters of the exporter.
#[derive(Debug, Clone)]
pub struct ExporterMetrics {
    /// Spans a collector accepted.
    pub exported: IntCounter,
    /// Spans dropped because the queue was full.
    pub dropped_queue_full: IntCounter,
    /// Spans dropped because an Export call failed.
    pub dropped_export_failed: IntCounter,
}

/// The request path's handle: queue spans for export.
#[derive(Debug, Clone)]
pub struct SpanExporter {
    tx: mpsc::Sender<SpanRecord>,
    metrics: ExporterMetrics,
    progress: Arc<super::Progress>,
}

/// Errors starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The endpoint URL is unusable.
    #[error("otlp_endpoint {url:?}: {reason}")]
    Endpoint {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The thread or its runtime could not be started.
    #[error("starting the OTLP exporter: {0}")]
    Start(std::io::Error),
}

impl SpanExporter {
    /// Starts the exporter thread sending to `endpoint`: an `http://host:port` collector, or an
    /// `https://host:port` one whose certificate chains to `ca_pem` (PEM) and names the host.
    pub fn start(
        endpoint: &str,
        ca_pem: Option<&str>,
        identity: &ExporterIdentity,
        metrics: ExporterMetrics,
    ) -> Result<Self, ExporterError> {
        let fail = |reason: String| ExporterError::Endpoint {
            url: endpoint.to_owned(),
            reason,
        };
        let tls = endpoint.starts_with("https://");
        if !tls && !endpoint.starts_with("http://") {
            return Err(fail("not an http:// or https:// URL".into()));
        }
        let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| fail(e.to_string()))?
            .connect_timeout(EXPORT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT);
        if tls {
            let ca = ca_pem.ok_or_else(|| fail("https:// needs otlp_ca_file".into()))?;
            let config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .assume_http2(true);
            channel = channel
                .tls_config(config)
                .map_err(|e| fail(format!("TLS: {e}")))?;
        }
        let (tx, rx) = mpsc::channel(QUEUE_SPANS);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ExporterError::Start)?;
        let resource = resource(identity);
        let task_metrics = metrics.clone();
        let url = endpoint.to_owned();
        let progress = Arc::new(super::Progress::default());
        let exported = Arc::clone(&progress);
        std::thread::Builder::new()
            .name("weft-otlp".into())
            .spawn(move || {
                runtime.block_on(async {
                    let client = TraceServiceClient::new(channel.connect_lazy());
                    export_loop(rx, client, resource, task_metrics, url, &exported).await;
                });
                exported.stop();
            })
            .map_err(ExporterError::Start)?;
        Ok(Self {
            tx,
            metrics,
            progress,
        })
    }

    /// What the exporter has been handed and has finished with (exported or dropped).
    pub fn progress(&self) -> &super::Progress {
        &self.progress
    }

    /// An exporter whose queue (`capacity` spans) the caller drains itself (tests).
    #[cfg(test)]
    pub(crate) fn queue_only(
        capacity: usize,
        metrics: ExporterMetrics,
    ) -> (Self, mpsc::Receiver<SpanRecord>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Self {
                tx,
                metrics,
                progress: Arc::default(),
            },
            rx,
        )
    }

    /// Queues a finished span; never blocks. A full queue drops and counts it.
    pub fn export(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.metrics.dropped_queue_full.inc();
        } else {
            self.progress.queued();
        }
    }
}

fn resource(id: &ExporterIdentity) -> Resource {
    Resource {
        attributes: vec![
            key_value("service.name", AttrValue::Str(id.service_name.clone())),
            key_value("service.namespace", AttrValue::Str(id.namespace.clone())),
            key_value("service.instance.id", AttrValue::Str(id.instance.clone())),
            key_value("telemetry.sdk.name", AttrValue::Str("weft-proxy".into())),
        ],
        dropped_attributes_count: 0,
    }
}

/// Builds one Export request from a batch.
pub fn export_request(resource: Resource, spans: Vec<SpanRecord>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "weft-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: spans.into_iter().map(SpanRecord::into_proto).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

async fn export_loop(
    mut rx: mpsc::Receiver<SpanRecord>,
    mut client: TraceServiceClient<tonic::transport::Channel>,
    resource: Resource,
    metrics: ExporterMetrics,
    url: String,
    progress: &super::Progress,
) {
    let mut failures_logged = 0u32;
    // Polls instead of awaiting `recv`: a span queued while this task waits would wake it (a
    // cross-thread wakeup per request under load).
    let mut tick = tokio::time::interval(BATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed = false;
    while !closed {
        tick.tick().await;
        let mut batch = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(s) => {
                    batch.push(s);
                    if batch.len() == BATCH_SPANS {
                        break;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        if batch.len() == BATCH_SPANS {
            // More may be queued: export the next batch right after this one.
            tick.reset_immediately();
        }
        let n = batch.len() as u64;
        match client.export(export_request(resource.clone(), batch)).await {
            Ok(resp) => {
                let rejected = resp
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                metrics.exported.inc_by(n.saturating_sub(rejected));
                metrics.dropped_export_failed.inc_by(rejected.min(n));
                failures_logged = 0;
            }
            Err(e) => {
                metrics.dropped_export_failed.inc_by(n);
                // One warning per outage, not one per batch.
                if failures_logged == 0 {
                    tracing::warn!(collector = %url, error = %e, "OTLP export failed; dropping spans");
                }
                failures_logged = failures_logged.saturating_add(1);
            }
        }
        progress.done(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SpanRecord {
        SpanRecord {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent_id: Some(SpanId([3; 8])),
            flags: 1,
            trace_state: "k=v".into(),
            kind: SpanKind::Client,
            name: "GET r".into(),
            start: UNIX_EPOCH + Duration::from_secs(10),
            end: UNIX_EPOCH + Duration::from_secs(11),
            attributes: vec![
                ("http.request.method", AttrValue::Str("GET".into())),
                ("http.response.status_code", AttrValue::Int(200)),
            ],
            error: false,
        }
    }

    #[test]
    fn converts_to_otlp() {
        let s = record().into_proto();
        assert_eq!(s.trace_id, vec![1; 16]);
        assert_eq!(s.span_id, vec![2; 8]);
        assert_eq!(s.parent_span_id, vec![3; 8]);
        assert_eq!(s.trace_state, "k=v");
        assert_eq!(s.flags, 0x301);
        assert_eq!(s.kind, i32::from(span::SpanKind::Client));
        assert_eq!(s.start_time_unix_nano, 10_000_000_000);
        assert_eq!(s.end_time_unix_nano, 11_000_000_000);
        assert_eq!(s.attributes.len(), 2);
        assert_eq!(s.attributes[1].key, "http.response.status_code");
        assert_eq!(
            s.attributes[1].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(200))
        );
        assert_eq!(s.status.unwrap().code, i32::from(status::StatusCode::Unset));

        let mut root = record();
        root.parent_id = None;
        root.kind = SpanKind::Server;
        root.error = true;
        let s = root.into_proto();
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.flags, 0x101);
        assert_eq!(s.kind, i32::from(span::SpanKind::Server));
        assert_eq!(s.status.unwrap().code, i32::from(status::StatusCode::Error));
    }

    #[test]
    fn request_carries_resource_and_scope() {
        let id = ExporterIdentity {
            service_name: "web".into(),
            namespace: "default".into(),
            instance: "web-1".into(),
        };
        let req = export_request(resource(&id), vec![record(), record()]);
        let rs = &req.resource_spans[0];
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(attrs[0].key, "service.name");
        assert_eq!(
            attrs[0].value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("web".into()))
        );
        assert_eq!(rs.scope_spans[0].spans.len(), 2);
        assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "weft-proxy");
    }

    #[test]
    fn rejects_non_http_endpoints() {
        let m = ExporterMetrics {
            exported: IntCounter::new("a", "a").unwrap(),
            dropped_queue_full: IntCounter::new("b", "b").unwrap(),
            dropped_export_failed: IntCounter::new("c", "c").unwrap(),
        };
        let id = ExporterIdentity {
            service_name: "web".into(),
            namespace: "default".into(),
            instance: "web-1".into(),
        };
        assert!(SpanExporter::start("https://collector:4317", None, &id, m.clone()).is_err());
        assert!(SpanExporter::start("ftp://collector:4317", None, &id, m).is_err());
    }
}
