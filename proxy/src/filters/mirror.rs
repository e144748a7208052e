//! Request mirroring (`filters.mirror`): a copy of a share of the route's requests goes to
//! another cluster, fire-and-forget, on its own task. The primary request is never delayed or
//! failed by it, and the copies are bounded in memory:
//!
//! - the copy is of the request as forwarded (after header mutation and rewrite), with its
//!   `Host` / `:authority` suffixed `-shadow` (`api:8080` -> `api-shadow:8080`) as Envoy and
//!   Istio do, so the mirror target can tell copies from real traffic; its response is read
//!   (up to 1 MiB, so the connection can be reused) and discarded;
//! - a request without a body is sent at once; a body is teed ([`crate::http::body::BodyTap`]):
//!   the primary body streams upstream untouched while a copy of up to `max_body_bytes` is
//!   kept, and the copy is sent when the primary body has ended. A body longer than that
//!   (announced by `content-length`, or found while streaming) is mirrored **headers-only**:
//!   an empty body and no `content-length`, sent as soon as the body is known to be too large.
//!   A primary body that fails or is abandoned before its end is not mirrored (`failed`);
//! - at most [`MAX_IN_FLIGHT`] copies are in flight per proxy (from the decision to mirror to
//!   the end of the mirror's exchange) and at most [`MAX_BUFFERED_BYTES`] of bodies are held
//!   for them; past the first a request is not mirrored (`dropped`), past the second its copy
//!   becomes headers-only;
//! - each exchange is bounded by the mirror cluster's request timeout, at most
//!   [`MAX_TIMEOUT`]; a slow or down mirror target only holds its own slots.
//!
//! Mirror results do not feed the mirror cluster's outlier detection or retries: a copy is not
//! a request anyone waits for. `weft_mirror_requests_total{route,result=sent|failed|dropped}`
//! counts them (`sent`: the mirror answered, whatever its status).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Method, Request, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use weft_proto::v1;

use super::metrics::MirrorCounters;
use super::{draw, FilterErrors, PPM_ALL};
use crate::cluster::{Cluster, UpstreamProtocol};
use crate::http::body::BodyTap;
use crate::http::headers::prepare_request;
use crate::metrics::Metrics;
use crate::retry::RequestBody;
use crate::upstream::Wire;

/// Most mirror copies in flight in this proxy.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most body bytes held for mirror copies in this proxy.
pub const MAX_BUFFERED_BYTES: usize = 64 << 20;
/// Longest a mirror exchange may take (a cluster request timeout of 0 = none gets this).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest `max_body_bytes` (the control plane's limit too).
pub const MAX_BODY: u32 = 16 << 20;
/// How much of a mirror's response is read to keep its connection (the rest: closed).
const MAX_DRAIN: usize = 1 << 20;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static BUFFERED: AtomicUsize = AtomicUsize::new(0);

/// One of the [`MAX_IN_FLIGHT`] slots, released on drop.
#[derive(Debug)]
struct Slot(());

impl Slot {
    fn acquire() -> Option<Self> {
        IN_FLIGHT
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Body bytes held against [`MAX_BUFFERED_BYTES`], released on drop.
#[derive(Debug, Default)]
struct Reserved(usize);

impl Reserved {
    fn grow(&mut self, n: usize) -> bool {
        let ok = BUFFERED
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|t| *t <= MAX_BUFFERED_BYTES)
            })
            .is_ok();
        if ok {
            self.0 += n;
        }
        ok
    }

    fn release(&mut self) {
        BUFFERED.fetch_sub(std::mem::take(&mut self.0), Ordering::AcqRel);
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.release();
    }
}

/// A compiled mirror.
#[derive(Debug)]
pub struct Mirror {
    cluster: Arc<Cluster>,
    ppm: u32,
    max_body: usize,
    counters: MirrorCounters,
}

impl Mirror {
    /// Compiles `m` for route `route`; the cluster is resolved in `clusters`.
    pub fn build(
        m: &v1::Mirror,
        route: &str,
        clusters: &std::collections::HashMap<Arc<str>, Arc<Cluster>>,
        metrics: &Metrics,
        errors: &mut FilterErrors,
    ) -> Option<Self> {
        let cluster = clusters.get(m.cluster.as_str());
        if cluster.is_none() {
            errors.push("mirror.cluster", format!("unknown cluster {:?}", m.cluster));
        }
        if m.ppm > PPM_ALL {
            errors.push(
                "mirror.ppm",
                format!("{} is more than {PPM_ALL} (millionths)", m.ppm),
            );
        }
        if m.max_body_bytes > MAX_BODY {
            errors.push(
                "mirror.max_body_bytes",
                format!("{} is more than {MAX_BODY}", m.max_body_bytes),
            );
        }
        let counters = match MirrorCounters::new(metrics, route) {
            Ok(c) => c,
            Err(e) => {
                errors.push("mirror", e.to_string());
                return None;
            }
        };
        Some(Self {
            cluster: Arc::clone(cluster?),
            ppm: m.ppm.min(PPM_ALL),
            max_body: usize::try_from(m.max_body_bytes).unwrap_or(usize::MAX),
            counters,
        })
    }

    /// Whether this request is mirrored (drawn per request).
    pub fn draw(&self) -> bool {
        draw(self.ppm)
    }

    /// Starts mirroring `req`, whose head is as it will be forwarded: the copy is sent now if
    /// there is no body to copy (or it is too large), else the returned tap copies the body as
    /// the primary request streams it and sends the copy when it ends.
    pub fn start<B: Body>(&self, req: &Request<B>) -> Option<Box<dyn BodyTap>> {
        let Some(slot) = Slot::acquire() else {
            self.counters.dropped.inc();
            return None;
        };
        let head = Head::of(req, self, slot);
        let body = req.body();
        if body.is_end_stream() {
            head.dispatch(None, None, Reserved::default());
            return None;
        }
        if body.size_hint().lower() > self.max_body as u64 {
            head.headers_only();
            return None;
        }
        Some(Box::new(Tee {
            head: Some(head),
            data: BytesMut::new(),
            trailers: None,
            max: self.max_body,
            reserved: Reserved::default(),
        }))
    }
}

/// `host[:port]` with `-shadow` after the host; IP literals are kept (no name to suffix).
fn shadow(authority: &str) -> Option<String> {
    let a = Authority::try_from(authority).ok()?;
    let host = a.host();
    if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Some(match a.port() {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    })
}

/// The head of a mirror copy and what sending it needs.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    wire: Wire,
    cluster: Arc<Cluster>,
    counters: MirrorCounters,
    _slot: Slot,
}

impl Head {
    fn of<B>(req: &Request<B>, mirror: &Mirror, slot: Slot) -> Self {
        let mut headers = req.headers().clone();
        let mut uri = req.uri().clone();
        if let Some(host) = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(shadow)
            .and_then(|h| HeaderValue::from_str(&h).ok())
        {
            headers.insert(header::HOST, host);
        }
        if let Some(a) = uri
            .authority()
            .and_then(|a| shadow(a.as_str()))
            .and_then(|a| Authority::try_from(a).ok())
        {
            let mut parts = uri.clone().into_parts();
            parts.authority = Some(a);
            if let Ok(u) = Uri::from_parts(parts) {
                uri = u;
            }
        }
        let wire = match mirror.cluster.protocol {
            UpstreamProtocol::Http1 => Wire::H1,
            UpstreamProtocol::Http2 => Wire::H2,
            UpstreamProtocol::Preserve if req.version() == Version::HTTP_2 => Wire::H2,
            UpstreamProtocol::Preserve => Wire::H1,
        };
        Self {
            method: req.method().clone(),
            uri,
            version: req.version(),
            headers,
            wire,
            cluster: Arc::clone(&mirror.cluster),
            counters: mirror.counters.clone(),
            _slot: slot,
        }
    }

    /// Sends the head with an empty body and no `content-length` (the body is too large).
    fn headers_only(mut self) {
        self.headers.remove(header::CONTENT_LENGTH);
        self.dispatch(None, None, Reserved::default());
    }

    /// Spawns the exchange on the current (data-path) runtime.
    fn dispatch(self, data: Option<Bytes>, trailers: Option<HeaderMap>, held: Reserved) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(self.send(data, trailers, held));
            }
            // Request bodies are only polled by the data path's runtime: not reached.
            Err(_) => self.counters.failed.inc(),
        }
    }

    async fn send(self, data: Option<Bytes>, trailers: Option<HeaderMap>, held: Reserved) {
        let Self {
            method,
            uri,
            version,
            headers,
            wire,
            cluster,
            counters,
            _slot,
        } = self;
        let mut req = Request::new(RequestBody::Buffered {
            data: data.filter(|d| !d.is_empty()),
            trailers,
        });
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        let Some(i) = cluster.pick_index(None) else {
            counters.failed.inc();
            return;
        };
        let endpoint = &cluster.endpoints[i];
        prepare_request(&mut req, wire, endpoint.addr);
        let limit = cluster
            .request_timeout
            .map_or(MAX_TIMEOUT, |t| t.min(MAX_TIMEOUT));
        let deadline = tokio::time::Instant::now() + limit;
        let sent = endpoint
            .pool
            .send(req, wire, cluster.connect_timeout, &cluster.connect_errors);
        let resp = match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::debug!(cluster = %cluster.name, error = %e, "mirror request failed");
                counters.failed.inc();
                return;
            }
            Err(_) => {
                tracing::debug!(cluster = %cluster.name, "mirror request timed out");
                counters.failed.inc();
                return;
            }
        };
        drop(held);
        counters.sent.inc();
        // An HTTP/1.1 connection goes back to its pool if the answer was read to the end.
        let _drained = tokio::time::timeout_at(deadline, drain(resp.into_body())).await;
    }
}

/// Reads and discards a response body; `true` if it ended within [`MAX_DRAIN`] bytes.
async fn drain<B: Body<Data = Bytes> + Unpin>(mut body: B) -> bool {
    let mut seen = 0usize;
    // Each frame adds data (bounded by MAX_DRAIN) or ends the body: the loop ends.
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        if let Some(d) = frame.data_ref() {
            seen += d.len();
            if seen > MAX_DRAIN {
                return false;
            }
        }
    }
    true
}

/// Copies the primary body (up to the cap) as it streams.
#[derive(Debug)]
struct Tee {
    /// `None` once sent (headers-only).
    head: Option<Head>,
    data: BytesMut,
    trailers: Option<HeaderMap>,
    max: usize,
    reserved: Reserved,
}

impl BodyTap for Tee {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if self.head.is_none() {
            return;
        }
        if let Some(d) = frame.data_ref() {
            if self.data.len() + d.len() > self.max || !self.reserved.grow(d.len()) {
                self.data = BytesMut::new();
                self.reserved.release();
                if let Some(head) = self.head.take() {
                    head.headers_only();
                }
                return;
            }
            self.data.extend_from_slice(d);
        } else if let Some(t) = frame.trailers_ref() {
            self.trailers = Some(t.clone());
        }
    }

    fn end(mut self: Box<Self>) {
        if let Some(head) = self.head.take() {
            let data = std::mem::take(&mut self.data).freeze();
            let held = std::mem::take(&mut self.reserved);
            head.dispatch(Some(data), self.trailers.take(), held);
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // The primary body failed or was dropped before its end: nothing whole to mirror.
        if let Some(head) = self.head.take() {
            head.counters.failed.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_hosts() {
        assert_eq!(shadow("api").as_deref(), Some("api-shadow"));
        assert_eq!(shadow("api.ns:8080").as_deref(), Some("api.ns-shadow:8080"));
        assert_eq!(shadow("127.0.0.1:80"), None);
        assert_eq!(shadow("[::1]:80"), None);
    }

    #[test]
    fn slots_and_bytes_are_bounded() {
        let slots: Vec<Slot> = std::iter::from_fn(Slot::acquire)
            .take(MAX_IN_FLIGHT + 10)
            .collect();
        // Other tests may hold slots meanwhile: at most the bound.
        assert!(slots.len() <= MAX_IN_FLIGHT);
        assert!(Slot::acquire().is_none());
        drop(slots);
        assert!(Slot::acquire().is_some());
        let mut r = Reserved::default();
        assert!(!r.grow(MAX_BUFFERED_BYTES + 1));
        assert!(r.grow(1024));
        assert_eq!(r.0, 1024);
        r.release();
        assert_eq!(r.0, 0);
    }
}
