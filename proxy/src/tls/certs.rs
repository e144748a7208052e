//! This proxy's own certificate: the [`CertStore`] holds the current key and chain behind an
//! `ArcSwap`, and is the rustls certificate resolver on both sides. A renewal swaps a new
//! [`Issued`] in; only handshakes that start afterwards see it, and connections already open keep
//! the session they negotiated.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use super::spiffe::{validity, SpiffeError, SpiffeId};

/// Why an issued certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IssuedError {
    /// The chain is empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// The leaf is unreadable or has no SPIFFE ID.
    #[error("leaf certificate: {0}")]
    Leaf(#[from] SpiffeError),
    /// The private key is not a supported type.
    #[error("private key: {0}")]
    Key(rustls::Error),
    /// The certificate is for another identity than the one asked for.
    #[error("certificate is for {got}, expected {expected}")]
    WrongIdentity {
        /// The identity we asked for.
        expected: String,
        /// The certificate's.
        got: String,
    },
}

/// A certificate with its key, as issued.
#[derive(Debug)]
pub struct Issued {
    /// For rustls.
    pub key: Arc<CertifiedKey>,
    /// The leaf's identity.
    pub id: SpiffeId,
    /// Leaf `notBefore`, Unix seconds.
    pub not_before: i64,
    /// Leaf `notAfter`, Unix seconds.
    pub not_after: i64,
}

impl Issued {
    /// Pairs `chain` (leaf first) with `key` (PKCS#8), reading identity and validity from the
    /// leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<Self, IssuedError> {
        let leaf = chain.first().ok_or(IssuedError::EmptyChain)?;
        let id = super::spiffe::from_cert(leaf)?;
        let (not_before, not_after) = validity(leaf)?;
        let signing =
            rustls::crypto::ring::sign::any_supported_type(key).map_err(IssuedError::Key)?;
        Ok(Self {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            id,
            not_before,
            not_after,
        })
    }
}

/// The current certificate, read by every handshake.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwapOption<Issued>,
    /// Bumped on every install, so waiters see the first certificate and every rotation.
    installed: watch::Sender<u64>,
}

impl Default for CertStore {
    fn default() -> Self {
        Self::new()
    }
}

impl CertStore {
    /// An empty store: handshakes fail until a certificate is installed.
    pub fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            installed: watch::Sender::new(0),
        }
    }

    /// The certificate in force.
    pub fn load(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }

    /// Swaps `issued` in for new handshakes.
    pub fn install(&self, issued: Issued) {
        self.current.store(Some(Arc::new(issued)));
        self.installed.send_modify(|n| *n += 1);
    }

    /// How many certificates were installed so far (grows on every rotation).
    pub fn generation(&self) -> u64 {
        *self.installed.borrow()
    }

    /// Resolves once a certificate is installed.
    pub async fn wait_ready(&self) {
        let mut rx = self.installed.subscribe();
        // `wait_for` only errs when the sender is gone, and `self` owns the sender.
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    fn current_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|i| Arc::clone(&i.key))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current_key()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current_key()
    }

    fn has_certs(&self) -> bool {
        // Always offer: a missing certificate shows as the peer's refusal, which is logged.
        true
    }
}
