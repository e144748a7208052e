//! What applying the control plane's pushes costs: `weft_config_apply_duration_seconds` (one
//! observation per applied or rejected response: merge, build and validate the snapshot, bind
//! its listeners, swap it in) and `weft_config_received_bytes_total` (the encoded size of every
//! `DiscoveryResponse` received, gRPC and HTTP/2 framing excluded).

use prometheus::{Histogram, HistogramOpts, IntCounter, Opts, Registry};

use crate::metrics::MetricsError;

/// Buckets from 100 µs to 10 s: an endpoint change of a small scope builds in well under a
/// millisecond, a first snapshot of thousands of services in hundreds.
const APPLY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// The two families.
#[derive(Debug, Clone)]
pub struct ApplyMetrics {
    /// `weft_config_apply_duration_seconds`.
    pub duration: Histogram,
    /// `weft_config_received_bytes_total`.
    pub received_bytes: IntCounter,
}

impl ApplyMetrics {
    /// The families, registered in `r`.
    pub fn register(r: &Registry) -> Result<Self, MetricsError> {
        let m = Self::unregistered();
        r.register(Box::new(m.duration.clone()))
            .map_err(|source| MetricsError::Register {
                name: "weft_config_apply_duration_seconds",
                source,
            })?;
        r.register(Box::new(m.received_bytes.clone()))
            .map_err(|source| MetricsError::Register {
                name: "weft_config_received_bytes_total",
                source,
            })?;
        Ok(m)
    }

    /// The same, registered nowhere (tests, embedders without a registry).
    pub fn unregistered() -> Self {
        // Names, help and buckets are constants: building the families cannot fail.
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "weft_config_apply_duration_seconds",
                "Time to apply one discovery response: merge, build and validate the snapshot, \
                 bind its listeners and swap it in (rejected responses included)",
            )
            .buckets(APPLY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| unreachable!("constant metric definition: {e}"));
        let received_bytes = IntCounter::with_opts(Opts::new(
            "weft_config_received_bytes_total",
            "Encoded bytes of the discovery responses received from the control plane",
        ))
        .unwrap_or_else(|e| unreachable!("constant metric definition: {e}"));
        Self {
            duration,
            received_bytes,
        }
    }
}
