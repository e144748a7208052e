//! The trust bundle: the trust domain and the root CAs peers' chains must end in.
//!
//! Two sources feed it: the `TRUST` resource pushed by the control plane (versioned, ACKed) and
//! the roots returned with our own certificate by `Identity.Certify`. The bundle in force is the
//! union of the latest roots from each, so during a root rotation (old and new root both
//! published for an overlap window) peers certified by either root verify, and a root dropped
//! from both sources stops being trusted for new handshakes at once. Verifiers read the current
//! bundle per handshake; open connections are not re-verified.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

/// Why a trust bundle is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// A `roots_pem` entry has no certificate or does not parse.
    #[error("roots_pem[{index}]: {reason}")]
    BadRoot {
        /// Index in the list.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The trust domain is empty.
    #[error("trust_domain: must not be empty")]
    NoTrustDomain,
}

/// A parsed, immutable trust bundle.
#[derive(Debug)]
pub struct TrustBundle {
    /// SPIFFE trust domain every peer identity must be in.
    pub trust_domain: String,
    /// Root certificates (DER), for `/config_dump`-style reporting and tests.
    pub roots: Vec<CertificateDer<'static>>,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Parses `roots_pem` (each entry may hold several PEM certificates).
    pub fn from_pem(trust_domain: &str, roots_pem: &[String]) -> Result<Self, TrustError> {
        if trust_domain.is_empty() {
            return Err(TrustError::NoTrustDomain);
        }
        let mut roots = Vec::new();
        for (index, pem) in roots_pem.iter().enumerate() {
            let bad = |reason: String| TrustError::BadRoot { index, reason };
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(format!("invalid PEM: {e}")))?;
            if certs.is_empty() {
                return Err(bad("no CERTIFICATE block".into()));
            }
            roots.extend(certs);
        }
        Self::from_der(trust_domain, roots)
    }

    /// A bundle of DER roots.
    pub fn from_der(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TrustError> {
        let mut anchors = Vec::with_capacity(roots.len());
        for (index, der) in roots.iter().enumerate() {
            let anchor =
                webpki::anchor_from_trusted_cert(der).map_err(|e| TrustError::BadRoot {
                    index,
                    reason: format!("not a usable root certificate: {e}"),
                })?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            roots,
            anchors,
        })
    }
}

#[derive(Debug, Default)]
struct Sources {
    /// From the `TRUST` resource.
    discovery: Option<(String, Vec<CertificateDer<'static>>)>,
    /// From the latest `Identity.Certify` answer.
    certify: Option<(String, Vec<CertificateDer<'static>>)>,
}

/// The bundle in force, swapped whole when either source changes.
#[derive(Debug, Default)]
pub struct TrustStore {
    sources: Mutex<Sources>,
    current: ArcSwapOption<TrustBundle>,
    /// Bumped whenever the bundle in force changes (not on a re-push of the same roots).
    generation: AtomicU64,
}

impl TrustStore {
    /// An empty store: every peer fails verification until a bundle arrives.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bundle for a handshake starting now.
    pub fn load(&self) -> Option<Arc<TrustBundle>> {
        self.current.load_full()
    }

    /// How many times the bundle in force changed (trust domain or roots): pooled tunnel
    /// connections verified under an older bundle take no new streams.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Installs the `TRUST` resource's bundle (already validated by [`TrustBundle::from_pem`]).
    pub fn set_discovery(&self, bundle: &TrustBundle) {
        self.update(|s| s.discovery = Some((bundle.trust_domain.clone(), bundle.roots.clone())));
    }

    /// Installs the roots returned by `Identity.Certify`.
    pub fn set_certify(&self, bundle: &TrustBundle) {
        self.update(|s| s.certify = Some((bundle.trust_domain.clone(), bundle.roots.clone())));
    }

    fn update(&self, change: impl FnOnce(&mut Sources)) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut sources);
        // The pushed resource names the trust domain when present; our certificate's otherwise.
        let Some(domain) = sources
            .discovery
            .as_ref()
            .or(sources.certify.as_ref())
            .map(|(d, _)| d.clone())
        else {
            return;
        };
        let mut roots: Vec<CertificateDer<'static>> = Vec::new();
        for (_, rs) in sources.discovery.iter().chain(sources.certify.iter()) {
            for r in rs {
                if !roots.contains(r) {
                    roots.push(r.clone());
                }
            }
        }
        match TrustBundle::from_der(&domain, roots) {
            Ok(b) => {
                let same = self
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.trust_domain == b.trust_domain && c.roots == b.roots);
                tracing::info!(trust_domain = %b.trust_domain, roots = b.roots.len(), "trust bundle updated");
                self.current.store(Some(Arc::new(b)));
                if !same {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
            }
            // Both sources were validated on their own; a union of valid roots is valid.
            Err(e) => {
                tracing::error!(error = %e, "trust bundle union rejected; keeping the old one")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testing::TestCa;

    #[test]
    fn parses_and_rejects() {
        let ca = TestCa::new("cluster.local");
        let b = TrustBundle::from_pem("cluster.local", &[ca.root_pem()]).unwrap();
        assert_eq!(b.roots.len(), 1);
        let e = TrustBundle::from_pem("cluster.local", &["garbage".into()]).unwrap_err();
        assert!(e.to_string().starts_with("roots_pem[0]"), "{e}");
        assert_eq!(
            TrustBundle::from_pem("", &[ca.root_pem()]).unwrap_err(),
            TrustError::NoTrustDomain
        );
    }

    #[test]
    fn union_of_sources_follows_rotation() {
        let old = TestCa::new("cluster.local");
        let new = TestCa::new("cluster.local");
        let store = TrustStore::new();
        assert!(store.load().is_none());
        store.set_certify(&TrustBundle::from_pem("cluster.local", &[old.root_pem()]).unwrap());
        assert_eq!(store.load().unwrap().roots.len(), 1);
        // Overlap window: the control plane publishes both roots.
        store.set_discovery(
            &TrustBundle::from_pem("cluster.local", &[old.root_pem(), new.root_pem()]).unwrap(),
        );
        assert_eq!(store.load().unwrap().roots.len(), 2);
        // Rotation finished: old root dropped from both sources.
        store.set_certify(&TrustBundle::from_pem("cluster.local", &[new.root_pem()]).unwrap());
        store.set_discovery(&TrustBundle::from_pem("cluster.local", &[new.root_pem()]).unwrap());
        let b = store.load().unwrap();
        assert_eq!(b.roots, vec![new.root_der()]);
    }

    #[test]
    fn generation_changes_only_when_the_bundle_does() {
        let (a, b) = (TestCa::new("cluster.local"), TestCa::new("cluster.local"));
        let store = TrustStore::new();
        let pem = |ca: &TestCa| TrustBundle::from_pem("cluster.local", &[ca.root_pem()]).unwrap();
        store.set_discovery(&pem(&a));
        let g = store.generation();
        store.set_discovery(&pem(&a));
        store.set_certify(&pem(&a));
        assert_eq!(store.generation(), g, "same roots again: same generation");
        store.set_discovery(&pem(&b));
        assert!(store.generation() > g);
    }
}
