//! The downstream response body: the upstream body streamed through untouched (data and
//! trailers), or a small proxy-generated body. Streaming upstream bodies also
//! - record the request's metrics exactly once, when the body ends or is dropped, with the
//!   `grpc-status` seen in headers or trailers, and
//! - let the HTTP/1.1 upstream connection go back to its pool, which its body does only if it
//!   was read to the end (otherwise the connection is in an unknown state and is closed), and
//! - count the response body bytes as data frames pass.
//!
//! [`CountedBody`] counts the downstream request body's bytes the same way.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::h1client::BoxError;
use crate::metrics::RequestMetrics;
use crate::upstream::UpstreamBody;

/// What to do when a streamed response finishes.
#[derive(Debug)]
pub struct Completion {
    /// Where to record the request.
    pub metrics: Arc<RequestMetrics>,
    /// Response status.
    pub status: StatusCode,
    /// `grpc-status` from the response headers (trailers-only responses) or trailers.
    pub grpc_status: Option<HeaderValue>,
    /// When the request arrived.
    pub start: Instant,
    /// The cluster's active-requests breaker slot, released when the response ends.
    pub active: Option<crate::breaker::Permit>,
    /// The request counts as in flight on its downstream connection until the response ends.
    pub in_flight: Option<crate::http::idle::InFlight>,
}

impl Completion {
    /// Records the request; returns the [`crate::lb::load::now_nanos`] reading it made.
    fn finish(mut self) -> u64 {
        let grpc = grpc_status_label(self.grpc_status.as_ref());
        // One clock read for the duration, the connection's idle tracking and the upstream
        // connection's idle start.
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        self.metrics
            .record_finished(self.status, grpc, elapsed.as_secs_f64());
        let nanos = crate::lb::load::nanos_at(now);
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.end_at(nanos);
        }
        nanos
    }
}

/// The `grpc_status` metric label for an upstream's `grpc-status` value: the code itself when
/// it is one of gRPC's 0..=16 (canonical decimal), `""` when there is none and `"other"` for
/// anything else, so that a misbehaving upstream cannot grow the label set without bound.
fn grpc_status_label(value: Option<&HeaderValue>) -> &str {
    let Some(value) = value else {
        return "";
    };
    match value.as_bytes() {
        [d] if d.is_ascii_digit() => value.to_str().unwrap_or("other"),
        [b'1', d] if (b'0'..=b'6').contains(d) => value.to_str().unwrap_or("other"),
        _ => "other",
    }
}

#[derive(Debug)]
enum Inner {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

/// Body of every response the proxy sends downstream.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    completion: Option<Completion>,
    /// Access log / span of the request, finished when the body ends (`observe::attach`).
    observation: Option<crate::observe::Observation>,
}

impl ResponseBody {
    /// A proxy-generated body (metrics are recorded by the caller).
    pub fn local(data: Bytes) -> Self {
        Self {
            inner: Inner::Local(Some(data)),
            completion: None,
            observation: None,
        }
    }

    /// No body at all, ended from the start (a 101, or a 200 to CONNECT: what follows the head
    /// is the tunnel, not a body).
    pub fn empty() -> Self {
        Self {
            inner: Inner::Local(None),
            completion: None,
            observation: None,
        }
    }

    /// An upstream body streamed through; `completion` runs when it ends or is dropped.
    pub fn upstream(body: impl Into<UpstreamBody>, completion: Completion) -> Self {
        Self {
            inner: Inner::Upstream(body.into()),
            completion: Some(completion),
            observation: None,
        }
    }

    /// Whether the proxy generated this body itself (an error response).
    pub fn is_local(&self) -> bool {
        matches!(self.inner, Inner::Local(_))
    }

    /// Finishes `observation` when this body ends (see [`crate::observe`]).
    pub fn observe(&mut self, observation: crate::observe::Observation) {
        self.observation = Some(observation);
    }

    fn end_observation(&mut self, how: crate::observe::BodyEnd) {
        if let Some(o) = self.observation.take() {
            o.end(how);
        }
    }

    fn complete(&mut self) {
        if let Some(c) = self.completion.take() {
            let now = c.finish();
            // The upstream connection goes back to its pool (if the exchange ended cleanly)
            // stamped with the same reading.
            if let Inner::Upstream(body) = &mut self.inner {
                body.release_at(now);
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::Upstream(body) => match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(c) = &mut this.completion {
                        if let Some(data) = frame.data_ref() {
                            c.metrics.add_response_bytes(data.len());
                        } else if let Some(v) =
                            frame.trailers_ref().and_then(|t| t.get("grpc-status"))
                        {
                            c.grpc_status = Some(v.clone());
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => {
                    this.complete();
                    this.end_observation(crate::observe::BodyEnd::UpstreamError);
                    Poll::Ready(Some(Err(e)))
                }
                None => {
                    this.complete();
                    this.end_observation(crate::observe::BodyEnd::Complete);
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Local(d) => d.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Local(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Inner::Local(None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies hyper never polls (empty ones) or that the client abandoned end here.
        let complete = self.is_end_stream();
        self.complete();
        if self.observation.is_some() {
            self.end_observation(if complete {
                crate::observe::BodyEnd::Complete
            } else {
                crate::observe::BodyEnd::Abandoned
            });
        }
    }
}

/// The downstream request body on its way upstream: passed through untouched, its data bytes
/// counted in `weft_request_body_bytes_total` as frames are read (retries buffer the body once,
/// so each downstream byte counts once).
#[derive(Debug)]
pub struct CountedBody {
    inner: Incoming,
    metrics: Arc<RequestMetrics>,
    /// Sees each frame as it passes (route mirroring's bounded copy), if any.
    tap: Option<Box<dyn BodyTap>>,
}

/// Sees the frames of a request body as they pass upstream, without changing or delaying them:
/// route mirroring keeps its bounded copy this way (`crate::filters::mirror`).
pub trait BodyTap: Send + Sync + std::fmt::Debug {
    /// A frame read from the downstream body.
    fn frame(&mut self, frame: &Frame<Bytes>);
    /// The body ended with every frame seen. Not called when it failed or was dropped first
    /// (the tap is dropped then).
    fn end(self: Box<Self>);
}

impl CountedBody {
    /// Counts `inner`'s bytes in `metrics`.
    pub fn new(inner: Incoming, metrics: Arc<RequestMetrics>) -> Self {
        Self {
            inner,
            metrics,
            tap: None,
        }
    }

    /// Shows every frame to `tap` as well.
    #[must_use]
    pub fn with_tap(mut self, tap: Option<Box<dyn BodyTap>>) -> Self {
        self.tap = tap;
        self
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                this.metrics.add_request_bytes(data.len());
            }
        }
        if this.tap.is_some() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(tap) = &mut this.tap {
                        tap.frame(f);
                    }
                    // A body whose length is known may not be polled again after its last
                    // frame: its end is seen here.
                    if this.inner.is_end_stream() {
                        if let Some(tap) = this.tap.take() {
                            tap.end();
                        }
                    }
                }
                None => {
                    if let Some(tap) = this.tap.take() {
                        tap.end();
                    }
                }
                Some(Err(_)) => this.tap = None,
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_label_is_bounded() {
        assert_eq!(grpc_status_label(None), "");
        for code in 0..=16 {
            let v = HeaderValue::from(code);
            assert_eq!(grpc_status_label(Some(&v)), code.to_string());
        }
        for odd in ["17", "99", "-1", "007", "00", "1 ", "", "abc", "123456789"] {
            let v = HeaderValue::from_static(odd);
            assert_eq!(grpc_status_label(Some(&v)), "other", "{odd:?}");
        }
        let opaque = HeaderValue::from_bytes(b"\xff").unwrap();
        assert_eq!(grpc_status_label(Some(&opaque)), "other");
    }
}
