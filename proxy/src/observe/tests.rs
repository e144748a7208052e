//! The request hooks end to end without sockets: header rewriting, sampling, what gets logged
//! and exported, and how requests end.

use std::io::Write;
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Request, StatusCode};
use prometheus::IntCounter;
use tokio::sync::mpsc;

use super::otlp::{AttrValue, ExporterMetrics};
use super::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TP_UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// Waits (bounded) until `n` lines were written and returns them.
    fn wait(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{n} lines never written: {lines:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn counter() -> IntCounter {
    IntCounter::new("c", "c").unwrap()
}

fn exporter() -> (SpanExporter, mpsc::Receiver<SpanRecord>) {
    SpanExporter::queue_only(
        16,
        ExporterMetrics {
            exported: counter(),
            dropped_queue_full: counter(),
            dropped_export_failed: counter(),
        },
    )
}

fn log(listeners: &[&str], format: LogFormat) -> (AccessLog, Lines) {
    let lines = Lines::default();
    let sink = AccessLogSink::with_writer(Box::new(lines.clone()), 64, counter()).unwrap();
    let log = AccessLog {
        listeners: listeners.iter().map(|l| (*l).into()).collect(),
        format,
        sink,
    };
    (log, lines)
}

fn request(traceparent: Option<&str>) -> Request<()> {
    let mut b = Request::builder()
        .uri("/api/items?x=1")
        .header("host", "backend")
        .header("tracestate", "vendor=abc")
        .header("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")
        .header("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7");
    if let Some(tp) = traceparent {
        b = b.header("traceparent", tp);
    }
    b.body(()).unwrap()
}

fn name(n: &str) -> Arc<str> {
    n.into()
}

fn sent_traceparent(req: &Request<()>) -> Option<TraceParent> {
    req.headers()
        .get("traceparent")
        .map(|v| TraceParent::parse(v.as_bytes()).expect("valid traceparent sent"))
}

fn untouched_b3_and_tracestate(req: &Request<()>) {
    assert_eq!(req.headers()["tracestate"], "vendor=abc");
    assert_eq!(
        req.headers()["b3"],
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
    );
    assert_eq!(
        req.headers()["x-b3-traceid"],
        "80f198ee56343ba864fe8b2a57d3eff7"
    );
}

#[test]
fn disabled_does_nothing() {
    let o = Observability::disabled();
    assert!(!o.is_active());
    let mut req = request(Some(TP));
    assert!(o
        .observe(&name("inbound"), Direction::Inbound, &mut req)
        .is_none());
    assert_eq!(req.headers()["traceparent"], TP);
    assert!(req.extensions().get::<UpstreamNote>().is_none());
    // Not observed: noting is a no-op.
    note_route(&req, "r", "c");
    assert!(note_of(&req).is_none());
}

#[test]
fn propagation_rewrites_the_parent_id_only() {
    let o = Observability::from_parts(
        None,
        Some(Tracing {
            sampling: 0.0,
            exporter: None,
        }),
    );
    let mut req = request(Some(TP));
    // Nothing to log or export: no observation, but the header is rewritten.
    assert!(o
        .observe(&name("outbound"), Direction::Outbound, &mut req)
        .is_none());
    let sent = sent_traceparent(&req).unwrap();
    let received = TraceParent::parse(TP.as_bytes()).unwrap();
    assert_eq!(sent.trace_id, received.trace_id);
    assert_eq!(sent.flags, received.flags);
    assert_ne!(sent.parent_id, received.parent_id);
    untouched_b3_and_tracestate(&req);

    // An invalid traceparent is treated as absent (and outbound never starts a trace).
    let mut req = request(Some("00-bad"));
    assert!(o
        .observe(&name("outbound"), Direction::Outbound, &mut req)
        .is_none());
    assert_eq!(req.headers()["traceparent"], "00-bad");
}

#[test]
fn inbound_starts_traces_by_sampling() {
    let always = Observability::from_parts(
        None,
        Some(Tracing {
            sampling: 1.0,
            exporter: None,
        }),
    );
    let mut req = request(None);
    always.observe(&name("inbound"), Direction::Inbound, &mut req);
    let started = sent_traceparent(&req).expect("inbound starts a trace");
    assert!(started.sampled());
    untouched_b3_and_tracestate(&req);

    let mut req = request(None);
    always.observe(&name("outbound"), Direction::Outbound, &mut req);
    assert!(
        sent_traceparent(&req).is_none(),
        "outbound never starts one"
    );

    let never = Observability::from_parts(
        None,
        Some(Tracing {
            sampling: 0.0,
            exporter: None,
        }),
    );
    let mut req = request(None);
    never.observe(&name("inbound"), Direction::Inbound, &mut req);
    assert!(sent_traceparent(&req).is_none());
}

#[test]
fn spans_follow_the_sampled_flag() {
    let (exp, mut rx) = exporter();
    let o = Observability::from_parts(
        None,
        Some(Tracing {
            sampling: 0.0,
            exporter: Some(exp),
        }),
    );
    // Unsampled: propagated, not recorded.
    let mut req = request(Some(TP_UNSAMPLED));
    assert!(o
        .observe(&name("inbound"), Direction::Inbound, &mut req)
        .is_none());
    assert!(!sent_traceparent(&req).unwrap().sampled());

    // Sampled: a SERVER span, child of the received parent, parent of what is sent on.
    let mut req = request(Some(TP));
    let mut obs = o
        .observe(&name("inbound"), Direction::Inbound, &mut req)
        .expect("sampled request is observed");
    // Set by the authorization layer before the request is sent upstream.
    req.headers_mut().insert(
        PEER_IDENTITY,
        HeaderValue::from_static("spiffe://cluster.local/ns/default/sa/web"),
    );
    let sent = sent_traceparent(&req).unwrap();
    note_route(&req, "inbound", "inbound");
    note_of(&req)
        .unwrap()
        .attempt("127.0.0.9:8080".parse().unwrap());
    obs.on_response(StatusCode::OK, &HeaderMap::new(), false);
    obs.end(BodyEnd::Complete);
    let span = rx.try_recv().expect("span queued");
    assert_eq!(span.kind, SpanKind::Server);
    assert_eq!(span.trace_id, sent.trace_id);
    assert_eq!(span.span_id, sent.parent_id);
    assert_eq!(
        span.parent_id,
        Some(TraceParent::parse(TP.as_bytes()).unwrap().parent_id)
    );
    assert_eq!(span.trace_state, "vendor=abc");
    assert!(!span.error);
    assert_eq!(span.name, "GET inbound");
    let attr = |k: &str| {
        span.attributes
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        attr("http.request.method"),
        Some(AttrValue::Str("GET".into()))
    );
    assert_eq!(attr("url.path"), Some(AttrValue::Str("/api/items".into())));
    assert_eq!(attr("http.response.status_code"), Some(AttrValue::Int(200)));
    assert_eq!(
        attr("server.address"),
        Some(AttrValue::Str("backend".into()))
    );
    assert_eq!(attr("weft.cluster"), Some(AttrValue::Str("inbound".into())));
    assert_eq!(
        attr("weft.upstream.address"),
        Some(AttrValue::Str("127.0.0.9:8080".into()))
    );
    assert_eq!(
        attr("weft.peer.identity"),
        Some(AttrValue::Str(
            "spiffe://cluster.local/ns/default/sa/web".into()
        ))
    );

    // A new root started by sampling has no parent.
    let (exp, mut rx) = exporter();
    let o = Observability::from_parts(
        None,
        Some(Tracing {
            sampling: 1.0,
            exporter: Some(exp),
        }),
    );
    let obs = o.observe(&name("inbound"), Direction::Inbound, &mut request(None));
    obs.expect("a started trace is observed")
        .end(BodyEnd::Complete);
    let span = rx.try_recv().unwrap();
    assert_eq!(span.parent_id, None);
    assert!(span.error, "no response status is an error");
}

#[test]
fn access_log_line_per_request() {
    let (log, lines) = log(&["outbound"], LogFormat::Json);
    let o = Observability::from_parts(Some(log), None);
    // Another listener: not logged.
    let mut req = request(None);
    assert!(o
        .observe(&name("inbound"), Direction::Inbound, &mut req)
        .is_none());

    let mut req = request(Some(TP));
    req.headers_mut().insert(
        PEER_IDENTITY,
        HeaderValue::from_static("spiffe://cluster.local/ns/default/sa/web"),
    );
    let mut obs = o
        .observe(&name("outbound"), Direction::Outbound, &mut req)
        .unwrap();
    // Without tracing the header is not touched, but its trace id is logged.
    assert_eq!(req.headers()["traceparent"], TP);
    note_route(&req, "default-backend.default", "backend.default");
    let note = note_of(&req).unwrap();
    note.attempt("127.0.0.6:9000".parse().unwrap());
    note.attempt("127.0.0.7:9000".parse().unwrap());
    let err = crate::http::error::ProxyError::RequestTimeout(Duration::from_secs(1)).to_response();
    obs.on_response(err.status(), err.headers(), true);
    obs.end(BodyEnd::Complete);
    let line = &lines.wait(1)[0];
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["authority"], "backend");
    assert_eq!(v["path"], "/api/items?x=1");
    assert_eq!(v["status"], 504);
    assert_eq!(v["response_flags"], "UT");
    assert_eq!(v["upstream"], "127.0.0.7:9000");
    assert_eq!(v["route"], "default-backend.default");
    assert_eq!(v["cluster"], "backend.default");
    assert_eq!(v["retries"], 1);
    // Outbound, `x-weft-peer-identity` is whatever the local app sent: not an identity.
    assert_eq!(v["peer_identity"], serde_json::Value::Null);
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["listener"], "outbound");
    assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(v["response_duration_ms"].is_number());
}

#[test]
fn abandoned_requests_are_logged_with_dc() {
    let (log, lines) = log(&[], LogFormat::Text);
    let o = Observability::from_parts(Some(log), None);
    let mut req = request(None);
    let obs = o
        .observe(&name("inbound"), Direction::Inbound, &mut req)
        .unwrap();
    // The request future was dropped before any response.
    drop(obs);
    let mut req = request(None);
    let mut obs = o
        .observe(&name("inbound"), Direction::Inbound, &mut req)
        .unwrap();
    obs.on_response(StatusCode::OK, &HeaderMap::new(), false);
    obs.end(BodyEnd::UpstreamError);
    let first = lines.wait(2);
    assert!(first[0].contains("\" 0 DC "), "{}", first[0]);
    assert!(first[1].contains("\" 200 UC "), "{}", first[1]);
    let mut req = request(None);
    let mut obs = o
        .observe(&name("inbound"), Direction::Inbound, &mut req)
        .unwrap();
    // An upstream's own x-weft-error (not a local response) sets no flag on this hop.
    let mut h = HeaderMap::new();
    h.insert("x-weft-error", HeaderValue::from_static("connect-failed"));
    obs.on_response(StatusCode::SERVICE_UNAVAILABLE, &h, false);
    obs.end(BodyEnd::Complete);
    let lines = lines.wait(3);
    assert!(lines[2].contains("\" 503 - "), "{}", lines[2]);
}

// The process-wide on/off switch is tested in proxy/tests/request_metrics_switch.rs: flipping it
// here would race with the unit tests that record metrics on other test threads.
