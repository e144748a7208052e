//! Rebuilding the current snapshot when a name's addresses change ([`Refresher`]).
//!
//! The resolved addresses live in each cluster's long-lived state; a snapshot reads them when it
//! is built. A change therefore rebuilds the snapshot from the resource sets it holds (nothing
//! is acknowledged: the control plane's versions do not change) and swaps it in exactly as a
//! config push does, so endpoints keep their pools, load and health by address.
//!
//! Ordering with config pushes: a rebuild here and an applied push (built on a blocking thread,
//! `crate::discovery`) each hold the listener manager's lock from loading the current snapshot
//! to storing its successor, so they never interleave: a change signalled while a push builds
//! makes this rebuild wait for the push and then rebuild what it stored. Every build reads the
//! latest resolved addresses, so a push built after a change carries it too.

use std::sync::{Arc, Mutex, PoisonError};

use super::EgressContext;
use crate::listen::ListenerManager;
use crate::metrics::Metrics;
use crate::snapshot::{nack_reason, Snapshot, SnapshotStore};

/// Rebuilds and swaps the current snapshot on DNS changes.
pub struct Refresher {
    store: Arc<SnapshotStore>,
    listeners: Arc<Mutex<ListenerManager>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher").finish_non_exhaustive()
    }
}

impl Refresher {
    /// A refresher of the snapshot in `store`, binding through `listeners` like the discovery
    /// client's applier.
    pub fn new(
        store: Arc<SnapshotStore>,
        listeners: Arc<Mutex<ListenerManager>>,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            listeners,
            metrics,
        }
    }

    /// Rebuilds on every change `context` signals, forever (run it on the control runtime).
    pub async fn run(self, context: Arc<EgressContext>) {
        loop {
            context.changed().await;
            match self.refresh() {
                Ok(true) => tracing::debug!("dns: snapshot rebuilt with the new addresses"),
                Ok(false) => {}
                Err(reason) => {
                    tracing::warn!(%reason, "dns: rebuilding the snapshot with the new addresses failed; keeping the current one until the next change or push")
                }
            }
        }
    }

    /// Rebuilds the current snapshot (if any) and swaps it in: `Ok(true)` when swapped. `Err`
    /// is the rejection (e.g. a client certificate file became unreadable since the push); the
    /// current snapshot stays.
    pub fn refresh(&self) -> Result<bool, String> {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(current) = self.store.load_full() else {
            return Ok(false);
        };
        let resources = current
            .resources
            .to_resources()
            .map_err(|e| e.to_string())?;
        let snapshot = Snapshot::build(resources, Some(&current), &self.metrics)
            .map_err(|e| nack_reason(&e))?;
        // The same listeners as the current snapshot: binds nothing, but stays correct if not.
        let prepared = listeners.prepare(&snapshot).map_err(|e| nack_reason(&e))?;
        let snapshot = Arc::new(snapshot);
        self.store.store(Some(Arc::clone(&snapshot)));
        listeners.commit(prepared, &snapshot);
        Ok(true)
    }
}
