//! Fuzz entry points (the `fuzz/` targets call these), kept in the library so the seed corpora
//! and the minimized crashes replay in the normal test suite (`tests/fuzz_corpus.rs`).
//!
//! Each function takes arbitrary bytes and panics only when an invariant is broken: errors and
//! rejections are fine.

use std::sync::OnceLock;

use prost::Message;
use weft_proto::v1;

use crate::detect::{self, Detection, MAX_DETECT_BYTES};
use crate::metrics::Metrics;
use crate::snapshot::{nack_reason, Resources, Snapshot};

/// [`detect::classify`] on `data`, and its invariants: the answer matches the bytes, is never
/// `NeedMore` at the bound, and a decided answer for any prefix is the answer for the whole.
pub fn detect(data: &[u8]) {
    let whole = detect::classify(data);
    match &whole {
        Detection::NeedMore => assert!(data.len() < MAX_DETECT_BYTES, "NeedMore at the bound"),
        Detection::Tls { sni } => {
            assert!(
                data.starts_with(&[0x16, 0x03]),
                "TLS without a record header"
            );
            if let Some(sni) = sni {
                assert!(!sni.is_empty(), "empty SNI");
            }
        }
        Detection::Http2 => assert!(data.starts_with(detect::H2_PREFACE)),
        Detection::Http1 => {
            let line = &data[..data.len().min(64)];
            assert!(line.first().is_some_and(u8::is_ascii_uppercase), "{line:?}");
            assert!(line.contains(&b' '), "{line:?}");
        }
        Detection::Opaque => {}
    }
    assert_eq!(
        detect::is_tls_prefix(data),
        matches!(whole, Detection::Tls { .. })
            || (whole == Detection::NeedMore && data.first() == Some(&0x16))
    );
    for cut in cut_points(data) {
        let prefix = detect::classify(&data[..cut]);
        if prefix != Detection::NeedMore {
            assert_eq!(prefix, whole, "the first {cut} bytes decided otherwise");
        }
    }
}

/// Where to cut `data` for the prefix check: every length up to 64, the middle, one short of the
/// end, and each TLS record boundary (where rustls gets to see a new record).
fn cut_points(data: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let len = data.len().min(MAX_DETECT_BYTES + 1);
    let mut boundaries = Vec::new();
    if data.first() == Some(&0x16) {
        let mut at = 0;
        while let Some(h) = data.get(at..at + 5) {
            at += 5 + usize::from(u16::from_be_bytes([h[3], h[4]]));
            if at >= len || boundaries.len() >= 16 {
                break;
            }
            boundaries.push(at);
        }
    }
    (0..len.min(65))
        .chain([len / 2, len.saturating_sub(1)])
        .chain(boundaries)
        .filter(move |&cut| cut < len)
}

/// [`crate::http::normalize::fuzz_normalize`]: the first byte picks the options, the rest is the
/// request target.
pub fn normalize(data: &[u8]) {
    crate::http::normalize::fuzz_normalize(data);
}

/// Decodes `data` as a `DiscoveryResponse`, merges it into empty resources as
/// `discovery::ConfigApplier` does, and builds a [`Snapshot`] from it (then builds it again on
/// top of the first, as the next push would). Rejections are fine; panics are not.
pub fn snapshot(data: &[u8]) {
    let Ok(resp) = v1::DiscoveryResponse::decode(data) else {
        return;
    };
    let resources = Resources::default().merge(&resp);
    let metrics = metrics();
    match Snapshot::build(resources.clone(), None, metrics) {
        Ok(first) => {
            if let Err(e) = Snapshot::build(resources, Some(&first), metrics) {
                panic!(
                    "accepted once, rejected on top of itself: {}",
                    nack_reason(&e)
                );
            }
        }
        Err(e) => {
            assert!(!e.is_empty(), "rejected without a reason");
            let _ = nack_reason(&e);
        }
    }
}

/// One metrics registry for every run (as one proxy process has).
fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().expect("metrics registry"))
}
