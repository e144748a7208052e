//! Transparent mode's metric families:
//!
//! - `weft_protocol_detections_total{direction,result}`: captured connections by what their
//!   first bytes were (`http1`, `http2`, `tls`, `opaque`), `timeout` (silent past the
//!   detection timeout: TCP) or `skipped` (a server-first / opaque port or destination: TCP at
//!   once). Every series exists from the start (2 x 6).
//! - `weft_tls_sni_total{direction,sni}`: captured TLS connections (passed through as TCP) by
//!   the ClientHello's server name, `""` without one; at most [`MAX_SNI_SERIES`] names per
//!   process, later ones count as `other`, so a client cannot grow the scrape without bound.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::sniff::Sniffed;
use crate::metrics::MetricsError;
use crate::snapshot::Direction;

/// Most distinct `sni` label values.
pub const MAX_SNI_SERIES: usize = 64;

const RESULTS: [&str; 6] = ["http1", "http2", "tls", "opaque", "timeout", "skipped"];

/// The families, with the detection handles resolved.
#[derive(Debug)]
pub struct DetectionMetrics {
    /// `weft_protocol_detections_total`.
    family: IntCounterVec,
    /// Its handles, indexed by direction (outbound, inbound), then [`RESULTS`].
    detections: [[IntCounter; 6]; 2],
    sni: IntCounterVec,
    /// SNI label values handed out so far.
    names: Mutex<HashSet<String>>,
}

fn direction_index(d: Direction) -> usize {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

impl DetectionMetrics {
    /// Registers the families in `r`.
    pub fn register(r: &Registry) -> Result<Self, MetricsError> {
        let m = Self::unregistered();
        for (name, c) in [
            ("weft_protocol_detections_total", &m.family),
            ("weft_tls_sni_total", &m.sni),
        ] {
            r.register(Box::new(c.clone()))
                .map_err(|source| MetricsError::Register { name, source })?;
        }
        Ok(m)
    }

    /// The families, not registered anywhere (tests).
    pub fn unregistered() -> Self {
        let family = detections_family();
        let detections = [Direction::Outbound, Direction::Inbound]
            .map(|d| RESULTS.map(|r| family.with_label_values(&[d.as_str(), r])));
        let sni = IntCounterVec::new(
            Opts::new(
                "weft_tls_sni_total",
                "Captured TLS connections (passed through as TCP) by ClientHello server name",
            ),
            &["direction", "sni"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        Self {
            family,
            detections,
            sni,
            names: Mutex::new(HashSet::new()),
        }
    }

    /// Counts one captured connection of `direction` detected as `sniffed`.
    pub fn record(&self, direction: Direction, sniffed: &Sniffed) {
        let Some(label) = sniffed.label() else {
            return;
        };
        let i = RESULTS.iter().position(|r| *r == label).unwrap_or(0);
        self.detections[direction_index(direction)][i].inc();
        if let Sniffed::Tls { sni } = sniffed {
            let name = sni.as_deref().unwrap_or("");
            let label = {
                let mut names = self
                    .names
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if names.contains(name) || names.len() < MAX_SNI_SERIES {
                    names.insert(name.to_owned());
                    name
                } else {
                    "other"
                }
            };
            self.sni
                .with_label_values(&[direction.as_str(), label])
                .inc();
        }
    }

    /// `weft_protocol_detections_total{direction,result}` (tests).
    pub fn detections(&self, direction: Direction, result: &str) -> u64 {
        RESULTS
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| self.detections[direction_index(direction)][i].get())
    }
}

fn detections_family() -> IntCounterVec {
    IntCounterVec::new(
        Opts::new(
            "weft_protocol_detections_total",
            "Captured connections by protocol detection result (http1, http2, tls, opaque, \
             timeout: silent past the detection timeout, skipped: a server-first or opaque port)",
        ),
        &["direction", "result"],
    )
    .unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}
