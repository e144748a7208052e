//! The control-plane client: one `Discovery.Stream` at a time, reconnected forever with jittered
//! exponential backoff while the last good snapshot keeps serving.
//!
//! Per stream: send `Hello{node, held versions}`, then for every `DiscoveryResponse` merge the
//! carried sets with the held ones, build and validate a snapshot, bind its new listeners, swap
//! it in, and answer `Ack{nonce, versions held}`; any failure answers `Nack{nonce, reason,
//! rejected versions}` and leaves the running config untouched ([`ConfigApplier`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::v1;
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::discovery_request::Kind;

use crate::listen::ListenerManager;
use crate::metrics::Metrics;
use crate::snapshot::{carried, nack_reason, Resources, Snapshot, SnapshotStore};
use crate::tls::certs::CertStore;
use crate::tls::control::{control_endpoint, discovery_endpoint};
use crate::tls::trust::TrustStore;

/// Why a discovery stream ended.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Could not connect to the control plane.
    #[error("connecting to control plane {url}: {source}")]
    Connect {
        /// The configured URL.
        url: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
    /// The stream failed (control plane gone, protocol error).
    #[error("discovery stream: {0}")]
    Stream(#[from] tonic::Status),
    /// Our request channel closed (the stream's sender task ended).
    #[error("discovery stream closed while sending an ack/nack")]
    SendClosed,
    /// The control-plane CA file or TLS settings are unusable.
    #[error("control-plane TLS: {0}")]
    Tls(String),
}

/// Displays an error with its `source()` chain (tonic's transport errors hide the cause).
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Applies discovery responses: build, validate, bind, swap, account.
pub struct ConfigApplier {
    store: Arc<SnapshotStore>,
    /// Receives the `TRUST` resource when it changes.
    trust: Option<Arc<TrustStore>>,
    listeners: Arc<Mutex<ListenerManager>>,
    metrics: Metrics,
}

impl ConfigApplier {
    /// An applier publishing to `store` and binding through `listeners`.
    pub fn new(
        store: Arc<SnapshotStore>,
        listeners: Arc<Mutex<ListenerManager>>,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            trust: None,
            listeners,
            metrics,
        }
    }

    /// Also installs applied `TRUST` resources into `trust` (mTLS verification).
    #[must_use]
    pub fn with_trust(mut self, trust: Arc<TrustStore>) -> Self {
        self.trust = Some(trust);
        self
    }

    /// The versions currently held (for Hello after a reconnect).
    pub fn held(&self) -> Vec<v1::TypeVersion> {
        self.store
            .load()
            .as_ref()
            .map(|s| s.resources.type_versions())
            .unwrap_or_default()
    }

    /// Applies `resp`; returns the ACK or NACK to send.
    pub fn apply(&self, resp: &v1::DiscoveryResponse) -> v1::DiscoveryRequest {
        let kinds = carried(resp);
        let current = self.store.load_full();
        let old_versions = current
            .as_ref()
            .map(|s| s.resources.clone())
            .unwrap_or_default();
        let result = self.try_apply(resp, current.as_deref());
        let acked = result.is_ok();
        for (kind, version) in &kinds {
            self.metrics.config_update(kind.as_str(), acked);
            if acked {
                self.metrics
                    .config_version(kind.as_str(), old_versions.version(*kind), version);
            }
        }
        let kind = match result {
            Ok(versions) => {
                tracing::info!(nonce = %resp.nonce, ?kinds, "config applied");
                Kind::Ack(v1::Ack {
                    nonce: resp.nonce.clone(),
                    versions,
                })
            }
            Err(reason) => {
                tracing::warn!(nonce = %resp.nonce, %reason, "config rejected; keeping the old one");
                Kind::Nack(v1::Nack {
                    nonce: resp.nonce.clone(),
                    error: reason,
                    rejected: kinds
                        .into_iter()
                        .map(|(k, version)| v1::TypeVersion {
                            r#type: k.proto().into(),
                            version,
                        })
                        .collect(),
                })
            }
        };
        v1::DiscoveryRequest { kind: Some(kind) }
    }

    fn try_apply(
        &self,
        resp: &v1::DiscoveryResponse,
        current: Option<&Snapshot>,
    ) -> Result<Vec<v1::TypeVersion>, String> {
        let held = current
            .map(|s| &s.resources)
            .cloned()
            .unwrap_or_else(Resources::default);
        let resources = held.merge(resp);
        let snapshot =
            Snapshot::build(resources, current, &self.metrics).map_err(|e| nack_reason(&e))?;
        // The lock is held only for binding and bookkeeping; nothing here awaits.
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let prepared = listeners.prepare(&snapshot).map_err(|e| nack_reason(&e))?;
        let snapshot = Arc::new(snapshot);
        self.store.store(Some(Arc::clone(&snapshot)));
        listeners.commit(prepared, &snapshot);
        if let (Some(store), Some(bundle), Some(_)) = (&self.trust, &snapshot.trust, &resp.trust) {
            store.set_discovery(bundle);
        }
        if let Some(listeners) = &resp.listeners {
            crate::log_level::from_control_plane(&listeners.log_level);
        }
        Ok(snapshot.resources.type_versions())
    }
}

/// The control-plane endpoint for `url`, reading the CA PEM from `ca` when given.
pub fn control_endpoint_from_file(
    url: &str,
    ca: Option<&Path>,
) -> Result<tonic::transport::Endpoint, DiscoveryError> {
    let pem =
        match ca {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                DiscoveryError::Tls(format!("control_plane_ca {}: {e}", p.display()))
            })?),
            None => None,
        };
    control_endpoint(url, pem.as_deref()).map_err(|e| DiscoveryError::Tls(e.to_string()))
}

/// Full-jitter exponential backoff.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Backoff starting at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: uniform in `[0, min(cap, base * 2^attempt)]`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    /// Back to the first step (after a healthy stream).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The discovery client.
pub struct Discovery {
    url: String,
    /// Bootstrap `control_plane_ca`, read at every connect attempt.
    control_plane_ca: Option<PathBuf>,
    /// When set, the first response is applied only once this store holds a certificate.
    wait_for_cert: Option<Arc<CertStore>>,
    node: v1::Node,
    applier: ConfigApplier,
}

impl Discovery {
    /// A client for the control plane at `url`, announcing `node`.
    pub fn new(url: String, node: v1::Node, applier: ConfigApplier) -> Self {
        Self {
            url,
            control_plane_ca: None,
            wait_for_cert: None,
            node,
            applier,
        }
    }

    /// Verifies an `https://` control plane with the CA(s) in `path`.
    #[must_use]
    pub fn with_control_plane_ca(mut self, path: Option<PathBuf>) -> Self {
        self.control_plane_ca = path;
        self
    }

    /// Opens no stream (so applies no configuration, binds no listener, stays unready) before
    /// `certs` has this proxy's first certificate, and presents it as the stream's TLS client
    /// certificate: a proxy with an identity never serves without it, and registers as it.
    #[must_use]
    pub fn wait_for_certificate(mut self, certs: Arc<CertStore>) -> Self {
        self.wait_for_cert = Some(certs);
        self
    }

    /// Runs streams forever, reconnecting with backoff.
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let mut got_response = false;
            match self.stream(&mut got_response).await {
                Ok(()) => {
                    tracing::info!(url = %self.url, "discovery stream ended by control plane")
                }
                Err(e) => tracing::warn!(error = %ErrorChain(&e), "discovery stream failed"),
            }
            if got_response {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting to control plane");
            tokio::time::sleep(delay).await;
        }
    }

    async fn stream(&self, got_response: &mut bool) -> Result<(), DiscoveryError> {
        // The stream is authenticated by this proxy's certificate: none yet, no stream.
        if let Some(certs) = &self.wait_for_cert {
            if certs.load().is_none() {
                tracing::info!(
                    "waiting for this proxy's certificate before opening the discovery stream"
                );
                certs.wait_ready().await;
            }
        }
        let ca = match &self.control_plane_ca {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                DiscoveryError::Tls(format!("control_plane_ca {}: {e}", p.display()))
            })?),
            None => None,
        };
        let (endpoint, connector) =
            discovery_endpoint(&self.url, ca.as_deref(), self.wait_for_cert.clone())
                .map_err(|e| DiscoveryError::Tls(e.to_string()))?;
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|source| DiscoveryError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(8);
        let hello = v1::DiscoveryRequest {
            kind: Some(Kind::Hello(v1::Hello {
                node: Some(self.node.clone()),
                held: self.applier.held(),
            })),
        };
        tx.send(hello)
            .await
            .map_err(|_| DiscoveryError::SendClosed)?;
        let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        tracing::info!(url = %self.url, "discovery stream open");
        while let Some(resp) = responses.message().await? {
            *got_response = true;
            let reply = self.applier.apply(&resp);
            tx.send(reply)
                .await
                .map_err(|_| DiscoveryError::SendClosed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..20u32 {
            let d = b.next_delay();
            let ceiling = (100u64 << attempt.min(16)).min(5000);
            assert!(
                d <= Duration::from_millis(ceiling),
                "attempt {attempt}: {d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
