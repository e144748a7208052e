//! Waking discovery streams: every stream watches the generation channel of its scope (its
//! service and namespace) and the mesh-wide one. A registry change wakes only the scopes it
//! may affect ([`super::ScopeCache::affected_by`]), a new policy set likewise
//! ([`super::ScopeCache::affected_by_policy`]); a new trust bundle wakes every stream (each
//! then finds its scope recompiled once in the scope cache, and pushes only what differs). A
//! woken stream still waits the push debounce before compiling, so a burst of registrations
//! becomes one push per affected proxy.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use crate::policy::ServiceKey;

/// The per-scope wake channels of one control plane.
#[derive(Debug, Default)]
pub struct Wakers {
    scopes: Mutex<HashMap<ServiceKey, watch::Sender<u64>>>,
}

impl Wakers {
    pub fn new() -> Self {
        Self::default()
    }

    /// A receiver woken whenever a change may affect `scope`.
    pub fn subscribe(&self, scope: &ServiceKey) -> watch::Receiver<u64> {
        self.scopes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(scope.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Wakes the streams of `scopes` with `generation`; returns how many streams that was.
    /// Channels no stream watches any more are dropped on the way.
    pub fn wake<'a>(
        &self,
        scopes: impl IntoIterator<Item = &'a ServiceKey>,
        generation: u64,
    ) -> usize {
        let mut map = self.scopes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut woken = 0;
        for scope in scopes {
            let Some(tx) = map.get(scope) else { continue };
            let receivers = tx.receiver_count();
            if receivers == 0 {
                map.remove(scope);
                continue;
            }
            tx.send_replace(generation);
            woken += receivers;
        }
        woken
    }

    /// How many scopes have a channel (for tests and bounds).
    pub fn scopes(&self) -> usize {
        self.scopes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Drops the channels no stream watches.
    pub fn prune(&self) {
        self.scopes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, tx| tx.receiver_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_woken_scopes_see_a_change() {
        let w = Wakers::new();
        let (a, b) = (
            ServiceKey::new("a", "default"),
            ServiceKey::new("b", "default"),
        );
        let mut ra = w.subscribe(&a);
        let mut ra2 = w.subscribe(&a);
        let mut rb = w.subscribe(&b);
        assert_eq!(w.wake([&a], 7), 2);
        assert!(ra.has_changed().unwrap() && ra2.has_changed().unwrap());
        assert!(!rb.has_changed().unwrap());
        assert_eq!(*ra.borrow_and_update(), 7);
        ra2.borrow_and_update();
        // An unknown scope wakes nobody; a scope nobody watches any more is dropped.
        assert_eq!(w.wake([&ServiceKey::new("c", "default")], 8), 0);
        drop(rb.borrow_and_update());
        drop(rb);
        assert_eq!(w.wake([&a, &b], 9), 2);
        assert_eq!(w.scopes(), 1);
        drop((ra, ra2));
        w.prune();
        assert_eq!(w.scopes(), 0);
    }
}
