//! Per-connection resolution of inbound per-peer request handles ([`PeerHandles`]).

use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::request::RequestMetrics;

/// Base handles one connection remembers its variants for (routes in use).
pub(super) const CONNECTION_SLOTS: usize = 4;

/// The request handles of one downstream connection whose client is a verified mesh identity
/// (inbound mTLS): its variant of each base handle it uses is resolved once
/// ([`RequestMetrics::for_peer`]) and then reused by every request of the connection (a lookup by
/// pointer among at most a few entries, under a lock only this connection takes).
///
/// The bases are held weakly (only to be found by pointer: a `Weak` keeps the allocation, so the
/// address is not reused while it is here): a connection does not keep the series of a route
/// that went away, only the variant it resolved, until the slot is reused or the connection ends.
pub struct PeerHandles {
    peer: Box<str>,
    /// (base, variant), most recently resolved last.
    pub(super) resolved: Mutex<Vec<(Weak<RequestMetrics>, Arc<RequestMetrics>)>>,
}

impl std::fmt::Debug for PeerHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHandles")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl PeerHandles {
    /// The handles of a connection from `peer` (its SPIFFE ID).
    pub fn new(peer: &str) -> Self {
        Self {
            peer: peer.into(),
            resolved: Mutex::new(Vec::with_capacity(1)),
        }
    }

    /// This connection's variant of `base`.
    pub fn resolve(&self, base: &Arc<RequestMetrics>) -> Arc<RequestMetrics> {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, v)) = resolved
            .iter()
            .find(|(b, _)| std::ptr::eq(b.as_ptr(), Arc::as_ptr(base)))
        {
            return Arc::clone(v);
        }
        let variant = base.for_peer(&self.peer);
        // Variants of bases gone (routes removed) go first, then the oldest.
        resolved.retain(|(b, _)| b.strong_count() > 0);
        if resolved.len() == CONNECTION_SLOTS {
            resolved.remove(0);
        }
        resolved.push((Arc::downgrade(base), Arc::clone(&variant)));
        variant
    }
}
