//! The request families and their handles: one live [`RequestMetrics`] per label set, the
//! lazily resolved `(code, grpc_status)` slots, and removal of a label set's series with its
//! last handle.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

use super::{PeerLabels, MAX_PEERS_PER_HANDLE, PEER_OTHER, TLS_MTLS};

/// The five request families.
pub(super) struct RequestFamilies {
    pub(super) requests_total: IntCounterVec,
    pub(super) request_duration: HistogramVec,
    pub(super) response_headers_duration: HistogramVec,
    pub(super) request_body_bytes_total: IntCounterVec,
    pub(super) response_body_bytes_total: IntCounterVec,
}

/// The request families and the live request handles by label set (direction, route, cluster,
/// tls, peer): at most one live handle per labels, whose last `Arc` removes the labels' series.
pub(super) struct RequestSeries {
    pub(super) families: RequestFamilies,
    pub(super) live: Mutex<LiveRequests>,
}

/// Handles by labels; an entry whose handle is dead is about to be removed by its `Drop` (or
/// replaced by a new handle for the same labels first).
pub(super) type LiveRequests = HashMap<[Box<str>; 5], LiveRequest>;

pub(super) struct LiveRequest {
    pub(super) handle: Weak<RequestMetrics>,
    /// Shared with the next handle of the same labels if it is created before this entry's
    /// handle finished dropping (see `Drop for RequestMetrics`).
    recorded: Arc<Recorded>,
}

const _: () = assert!(
    FAST_SLOTS <= u32::BITS as usize,
    "Recorded::fast is one bit per slot"
);

/// The `(code, grpc_status)` combinations of `weft_requests_total` recorded on one label set:
/// what removing its series must remove.
#[derive(Default)]
struct Recorded {
    /// Bit `i`: fast slot `i` was resolved by a handle of these labels (set once per handle and
    /// slot, in the slot's `get_or_init`: nothing on the per-request path).
    fast: AtomicU32,
    /// The rare combinations (the slow path): `grpc_status` -> codes.
    rare: Mutex<HashMap<Box<str>, HashSet<u16>>>,
}

/// Number of lazily resolved `(code, grpc_status)` slots per destination; see [`fast_slot`].
pub(super) const FAST_SLOTS: usize = 32;

/// Maps the common `(code, grpc_status)` pairs to a slot so that recording them touches no lock.
pub(super) fn fast_slot(code: u16, grpc_status: &str) -> Option<usize> {
    if grpc_status.is_empty() {
        let slot = match code {
            200 => 0,
            201 => 1,
            204 => 2,
            301 => 3,
            302 => 4,
            304 => 5,
            400 => 6,
            401 => 7,
            403 => 8,
            404 => 9,
            429 => 10,
            500 => 11,
            502 => 12,
            503 => 13,
            504 => 14,
            _ => return None,
        };
        return Some(slot);
    }
    if code != 200 {
        return None;
    }
    // gRPC status codes 0..=16 ride on HTTP 200.
    match grpc_status.as_bytes() {
        [d] if d.is_ascii_digit() => Some(15 + usize::from(d - b'0')),
        [b'1', d] if (b'0'..=b'6').contains(d) => Some(25 + usize::from(d - b'0')),
        _ => None,
    }
}

/// The HTTP codes of fast slots `0..15` (without `grpc_status`), in slot order.
const FAST_CODES: [u16; 15] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504,
];
/// The gRPC statuses of fast slots `15..32` (on HTTP 200), in slot order.
const FAST_GRPC: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// The `(code, grpc_status)` of fast slot `slot`: the inverse of [`fast_slot`].
pub(super) fn fast_slot_labels(slot: usize) -> (u16, &'static str) {
    match slot.checked_sub(FAST_CODES.len()) {
        None => (FAST_CODES[slot], ""),
        Some(g) => (200, FAST_GRPC[g]),
    }
}

/// The label values of a request handle.
pub(super) fn request_labels(
    direction: &str,
    route: &str,
    cluster: &str,
    peer: &PeerLabels,
) -> [Box<str>; 5] {
    [
        direction.into(),
        route.into(),
        cluster.into(),
        peer.tls().into(),
        peer.peer.clone(),
    ]
}

impl RequestSeries {
    pub(super) fn lock_live(&self) -> MutexGuard<'_, LiveRequests> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live handle with `labels`, or a new one.
    pub(super) fn handle(self: &Arc<Self>, labels: [Box<str>; 5]) -> Arc<RequestMetrics> {
        let mut live = self.lock_live();
        self.handle_in(&mut live, labels)
    }

    /// [`RequestSeries::handle`] with the live-handle lock held (`live`).
    ///
    /// Why one lock for creating handles and removing series: a handle's series are removed by
    /// its `Drop`, which runs after its last `Arc` is gone, so a new handle for the same labels
    /// can be created in between (the old entry no longer upgrades). That new handle resolves
    /// the families' existing children (the series are still there). If the old handle's `Drop`
    /// then removed the series, the new handle would count into children no longer exported:
    /// live series gone from `/metrics`. So `Drop` removes them only if, under this lock, the
    /// entry for its labels is still itself; a handle created in between replaced the entry (and
    /// took over its [`Recorded`], so the codes the old one recorded are removed with the new
    /// one). Creation either happens before the `Drop` takes the lock (replaces the entry: the
    /// series stay, owned by the new handle) or after it (the series are gone: new children).
    pub(super) fn handle_in(
        self: &Arc<Self>,
        live: &mut LiveRequests,
        labels: [Box<str>; 5],
    ) -> Arc<RequestMetrics> {
        let recorded = match live.get(&labels) {
            Some(entry) => match entry.handle.upgrade() {
                Some(handle) => return handle,
                // Dying, its `Drop` waiting for the lock: continue its series.
                None => Arc::clone(&entry.recorded),
            },
            None => Arc::default(),
        };
        let handle = Arc::new(RequestMetrics::new(
            Arc::clone(self),
            labels.clone(),
            Arc::clone(&recorded),
        ));
        live.insert(
            labels,
            LiveRequest {
                handle: Arc::downgrade(&handle),
                recorded,
            },
        );
        handle
    }

    /// Removes every series of `labels` (with the live-handle lock held: see
    /// [`RequestSeries::handle_in`]).
    fn remove_series(&self, labels: &[Box<str>; 5], recorded: &Recorded) {
        let values: [&str; 5] = std::array::from_fn(|i| &*labels[i]);
        let f = &self.families;
        // An error means the series is not there (already removed): nothing to do.
        let _ = f.request_duration.remove_label_values(&values);
        let _ = f.response_headers_duration.remove_label_values(&values);
        let _ = f.request_body_bytes_total.remove_label_values(&values);
        let _ = f.response_body_bytes_total.remove_label_values(&values);
        let remove_code = |code: u16, grpc: &str| {
            let code_str = code.to_string();
            let [d, r, c, t, p] = values;
            let _ = f.requests_total.remove_label_values(&[
                d,
                r,
                c,
                t,
                p,
                &code_str,
                code_class(code),
                grpc,
            ]);
        };
        let fast = recorded.fast.load(Ordering::Acquire);
        for slot in (0..FAST_SLOTS).filter(|s| fast & (1 << s) != 0) {
            let (code, grpc) = fast_slot_labels(slot);
            remove_code(code, grpc);
        }
        let rare = recorded.rare.lock().unwrap_or_else(PoisonError::into_inner);
        for (grpc, codes) in rare.iter() {
            for &code in codes {
                remove_code(code, grpc);
            }
        }
    }
}

/// Per (direction, route, cluster, tls, peer) request metrics, resolved when the snapshot is
/// built (inbound per-peer variants: once per connection,
/// [`PeerHandles`](super::PeerHandles)). One live handle per label set
/// ([`Metrics::request_metrics`](super::Metrics::request_metrics)); dropping the last `Arc`
/// removes its series.
pub struct RequestMetrics {
    series: Arc<RequestSeries>,
    /// direction, route, cluster, tls, peer.
    labels: [Box<str>; 5],
    duration: Histogram,
    headers_duration: Histogram,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    fast: [OnceLock<IntCounter>; FAST_SLOTS],
    /// The codes recorded on these labels, shared with a handle that replaced this one early.
    recorded: Arc<Recorded>,
    /// The variants of this handle per caller, created on first use; they live as long as
    /// this handle (and the connections holding one).
    peers: OnceLock<PeerVariants>,
}

/// The per-peer variants of one base handle, at most [`MAX_PEERS_PER_HANDLE`] by identity, and
/// the shared `peer="other"` one. The base is shared by every snapshot that keeps its route, so
/// the admitted callers are not reset by config pushes.
#[derive(Default)]
struct PeerVariants {
    by_peer: Mutex<HashMap<Box<str>, Arc<RequestMetrics>>>,
    other: OnceLock<Arc<RequestMetrics>>,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Drop for RequestMetrics {
    /// Removes this handle's series, unless a newer handle of the same labels took them over
    /// (see [`RequestSeries::handle_in`]). The variants (`peers`) drop after this, each with
    /// its own `Drop` (the lock is released by then).
    fn drop(&mut self) {
        let this: *const Self = self;
        let mut live = self.series.lock_live();
        let ours = live
            .get(&self.labels)
            .is_some_and(|e| std::ptr::eq(e.handle.as_ptr(), this));
        if ours {
            live.remove(&self.labels);
            self.series.remove_series(&self.labels, &self.recorded);
        }
    }
}

impl RequestMetrics {
    fn new(series: Arc<RequestSeries>, labels: [Box<str>; 5], recorded: Arc<Recorded>) -> Self {
        let values: [&str; 5] = std::array::from_fn(|i| &*labels[i]);
        let families = &series.families;
        Self {
            duration: families.request_duration.with_label_values(&values),
            headers_duration: families
                .response_headers_duration
                .with_label_values(&values),
            request_bytes: families.request_body_bytes_total.with_label_values(&values),
            response_bytes: families
                .response_body_bytes_total
                .with_label_values(&values),
            series,
            labels,
            fast: std::array::from_fn(|_| OnceLock::new()),
            recorded,
            peers: OnceLock::new(),
        }
    }

    /// The `route` label (access logs and spans name the route with it).
    pub fn route(&self) -> &str {
        &self.labels[1]
    }

    /// The `tls` label (`mtls` or `none`).
    pub fn tls(&self) -> &str {
        &self.labels[3]
    }

    /// The `peer` label (a SPIFFE ID, `""` or `other`).
    pub fn peer(&self) -> &str {
        &self.labels[4]
    }

    /// The variant of these handles for requests from the verified mesh identity `peer` (an
    /// inbound mTLS connection): `tls="mtls"`, `peer=<peer>`, or `peer="other"` once
    /// [`MAX_PEERS_PER_HANDLE`] other identities have their own. Takes locks and may resolve
    /// labels: call it once per connection ([`PeerHandles`](super::PeerHandles)), never per
    /// request.
    pub fn for_peer(&self, peer: &str) -> Arc<RequestMetrics> {
        let variants = self.peers.get_or_init(PeerVariants::default);
        let variant = |peer: &str| {
            let [d, r, c, _, _] = &self.labels;
            self.series.handle([
                d.clone(),
                r.clone(),
                c.clone(),
                TLS_MTLS.into(),
                peer.into(),
            ])
        };
        {
            let mut by_peer = variants
                .by_peer
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(m) = by_peer.get(peer) {
                return Arc::clone(m);
            }
            if by_peer.len() < MAX_PEERS_PER_HANDLE {
                let m = variant(peer);
                by_peer.insert(peer.into(), Arc::clone(&m));
                return m;
            }
        }
        Arc::clone(variants.other.get_or_init(|| variant(PEER_OTHER)))
    }

    /// Records one request answered by the proxy itself (an error response): its headers and
    /// its (small, local) body are ready at the same time, so both histograms get `seconds`.
    pub fn record(&self, code: http::StatusCode, grpc_status: &str, seconds: f64) {
        if !crate::observe::request_metrics_enabled() {
            return;
        }
        self.headers_duration.observe(seconds);
        self.record_finished(code, grpc_status, seconds);
    }

    /// Records that the upstream's response headers are ready, `seconds` after the request
    /// arrived (`weft_response_headers_duration_seconds`).
    pub fn record_response_headers(&self, seconds: f64) {
        if !crate::observe::request_metrics_enabled() {
            return;
        }
        self.headers_duration.observe(seconds);
    }

    /// Counts request body bytes read from the downstream.
    #[inline]
    pub fn add_request_bytes(&self, n: usize) {
        if n > 0 && crate::observe::request_metrics_enabled() {
            self.request_bytes.inc_by(n as u64);
        }
    }

    /// Counts response body bytes streamed downstream.
    #[inline]
    pub fn add_response_bytes(&self, n: usize) {
        if n > 0 && crate::observe::request_metrics_enabled() {
            self.response_bytes.inc_by(n as u64);
        }
    }

    /// Records one finished request (its response body ended), `seconds` after it arrived.
    pub fn record_finished(&self, code: http::StatusCode, grpc_status: &str, seconds: f64) {
        // `observability.metrics.requests: false` (the on/off benchmark).
        if !crate::observe::request_metrics_enabled() {
            return;
        }
        self.duration.observe(seconds);
        let class = code_class(code.as_u16());
        let counter = |code: &str| {
            let [d, r, c, t, p] = &self.labels;
            self.series.families.requests_total.with_label_values(&[
                &**d,
                &**r,
                &**c,
                &**t,
                &**p,
                code,
                class,
                grpc_status,
            ])
        };
        match fast_slot(code.as_u16(), grpc_status) {
            Some(slot) => self.fast[slot]
                .get_or_init(|| {
                    // Once per handle and slot: the series to remove with these labels.
                    self.recorded.fast.fetch_or(1 << slot, Ordering::Release);
                    counter(code.as_str())
                })
                .inc(),
            // Rare combinations: a read-locked lookup in the family, and one in the set of
            // combinations to remove with the handle (allocates only the first time).
            None => {
                counter(code.as_str()).inc();
                self.note_rare(code.as_u16(), grpc_status);
            }
        }
    }

    /// Remembers that `(code, grpc_status)` (not a fast slot) was recorded on these labels.
    fn note_rare(&self, code: u16, grpc_status: &str) {
        let mut rare = self
            .recorded
            .rare
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match rare.get_mut(grpc_status) {
            Some(codes) => {
                codes.insert(code);
            }
            None => {
                rare.insert(grpc_status.into(), HashSet::from([code]));
            }
        }
    }
}

/// The `code_class` label of an HTTP status: `1xx`..`5xx`, else `other` (static strings, no allocation).
pub(super) fn code_class(code: u16) -> &'static str {
    match code / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        // 600..=999: valid for the `http` crate, never standard; kept to one series.
        _ => "other",
    }
}
