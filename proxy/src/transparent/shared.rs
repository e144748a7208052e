//! What every captured connection shares ([`Transparent`]), apart from the code that serves
//! them (`super`), so the data plane's shared state ([`crate::plane::DataPlane`]) can hold it
//! without depending on that code.

use std::sync::Arc;

use super::destinations::{DestinationCache, Destinations};
use super::metrics::DetectionMetrics;
use crate::snapshot::Snapshot;

/// What captured connections share: the per-snapshot lookup tables and the metric families.
#[derive(Debug)]
pub struct Transparent {
    tables: DestinationCache,
    metrics: DetectionMetrics,
}

impl Transparent {
    /// With `metrics` (registered in the proxy's registry).
    pub fn new(metrics: DetectionMetrics) -> Self {
        Self {
            tables: DestinationCache::default(),
            metrics,
        }
    }

    /// With unregistered metrics (tests).
    pub fn unregistered() -> Self {
        Self::new(DetectionMetrics::unregistered())
    }

    /// The detection counters.
    pub fn metrics(&self) -> &DetectionMetrics {
        &self.metrics
    }

    /// The lookup tables of `snapshot`.
    pub fn destinations(&self, snapshot: &Arc<Snapshot>) -> Arc<Destinations> {
        self.tables.get(snapshot)
    }
}
