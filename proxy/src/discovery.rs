//! The control-plane client: one `Discovery.Stream` at a time, reconnected forever with jittered
//! exponential backoff while the last good snapshot keeps serving.
//!
//! Per stream: send `Hello{node, held versions}`, then for every `DiscoveryResponse` merge the
//! carried sets with the held ones, build and validate a snapshot, bind its new listeners, swap
//! it in, and answer `Ack{nonce, versions held}`; any failure answers `Nack{nonce, reason,
//! rejected versions}` and leaves the running config untouched ([`ConfigApplier`]).
//!
//! **Failover.** The bootstrap may name several control-plane replicas (a list of URLs, or a
//! DNS name with several addresses): [`targets`] expands them into addresses tried in order.
//! When an attempt fails or a stream ends, the client moves to the next address after a
//! [`Backoff`] delay (jittered, 50..100 ms after a healthy stream, doubling to 5 s while
//! attempts keep failing). The new stream's Hello lists the versions the proxy holds, and the
//! control plane sends only the types whose version differs: replicas compute identical
//! versions (content hashes of identical inputs), so a proxy moving between replicas of one
//! mesh is pushed nothing. Meanwhile the last snapshot keeps serving: the data path never waits
//! for the control plane. [`status`] exports where the client is and why it reconnected.

pub mod apply_metrics;
pub mod backoff;
pub mod delta;
pub mod status;
pub mod targets;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::v1;
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::discovery_request::Kind;

use crate::listen::ListenerManager;
use crate::metrics::Metrics;
use crate::snapshot::{
    carried, nack_reason, EndpointChange, HeldEndpoints, ResourceKind, Resources, Snapshot,
    SnapshotStore,
};
use crate::tls::certs::CertStore;
use crate::tls::control::{control_endpoint, discovery_endpoint};
use crate::tls::trust::TrustStore;

pub use apply_metrics::ApplyMetrics;
pub use backoff::Backoff;
use status::{ControlPlaneStatus, Reason};
use targets::{Lookup, Rotation, Target};

/// Why a discovery stream ended.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Could not connect to the control plane.
    #[error("connecting to control plane {url} at {addr}: {source}")]
    Connect {
        /// The configured URL.
        url: String,
        /// The address dialled.
        addr: std::net::SocketAddr,
        /// tonic's error.
        source: tonic::transport::Error,
    },
    /// No address to try: no URL resolved.
    #[error("no control-plane address: {0}")]
    NoAddress(String),
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
///
/// The held resource sets not carried by a response are copied into the new snapshot's (the
/// carried ones are moved from the response), and [`Snapshot::build`] reuses what did not
/// change from the current snapshot (clusters, route tables and routes, policies, trust), so an
/// endpoint change rebuilds the changed clusters and the routes to them only. The replaced
/// snapshot is released on the control thread ([`retire`]), not by the last request that held
/// it on the data path.
pub struct ConfigApplier {
    store: Arc<SnapshotStore>,
    /// Receives the `TRUST` resource when it changes.
    trust: Option<Arc<TrustStore>>,
    listeners: Arc<Mutex<ListenerManager>>,
    metrics: Metrics,
    apply_metrics: ApplyMetrics,
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
            apply_metrics: ApplyMetrics::unregistered(),
        }
    }

    /// Records every apply in `metrics` (registered by the caller).
    #[must_use]
    pub fn with_apply_metrics(mut self, metrics: ApplyMetrics) -> Self {
        self.apply_metrics = metrics;
        self
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
        self.apply_owned(resp.clone())
    }

    /// Applies `resp`, moving its sets into the new snapshot; returns the ACK or NACK to send.
    /// Blocking (builds the snapshot): the discovery client runs it off its runtime's thread.
    pub fn apply_owned(&self, resp: v1::DiscoveryResponse) -> v1::DiscoveryRequest {
        let started = Instant::now();
        self.apply_metrics
            .received_bytes
            .inc_by(prost::Message::encoded_len(&resp) as u64);
        // An endpoint delta becomes the whole set it describes ([`delta`]); a bad one is NACKed.
        let held = self.store.load();
        let resolved = match delta::resolve(
            held.as_ref().and_then(|s| s.resources.endpoints.as_deref()),
            resp,
            &self.metrics,
        ) {
            Ok(resolved) => resolved,
            Err(nack) => return *nack,
        };
        drop(held);
        let mut kinds = carried(&resolved.resp);
        if let Some((set, _)) = &resolved.endpoints {
            kinds.push((ResourceKind::Endpoints, set.version.clone()));
        }
        let delta::Resolved {
            resp,
            endpoints: endpoint_delta,
        } = resolved;
        let nonce = resp.nonce.clone();
        // Held from loading the current snapshot to storing its successor: the DNS refresher
        // (`crate::egress::refresh`) rebuilds under the same lock, so a rebuild for new addresses
        // either comes before this push (which then reads them) or after it (and rebuilds what
        // it stored); neither overwrites the other's snapshot. The build runs off the control
        // runtime's thread, so a refresh arriving meanwhile waits for it.
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.store.load_full();
        let old_versions: Vec<Option<String>> = kinds
            .iter()
            .map(|(k, _)| {
                current
                    .as_ref()
                    .and_then(|s| s.resources.version(*k))
                    .map(str::to_owned)
            })
            .collect();
        let result = self.try_apply(resp, endpoint_delta, current.as_deref(), &mut listeners);
        drop(listeners);
        self.apply_metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(old) = current.filter(|_| result.is_ok()) {
            retire(old);
        }
        let acked = result.is_ok();
        for ((kind, version), old) in kinds.iter().zip(&old_versions) {
            self.metrics.config_update(kind.as_str(), acked);
            if acked {
                self.metrics
                    .config_version(kind.as_str(), old.as_deref(), version);
            }
        }
        let kind = match result {
            Ok(versions) => {
                tracing::info!(%nonce, ?kinds, "config applied");
                Kind::Ack(v1::Ack { nonce, versions })
            }
            Err(reason) => {
                tracing::warn!(%nonce, %reason, "config rejected; keeping the old one");
                Kind::Nack(v1::Nack {
                    nonce,
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
        resp: v1::DiscoveryResponse,
        endpoint_delta: Option<(HeldEndpoints, EndpointChange)>,
        current: Option<&Snapshot>,
        listeners: &mut ListenerManager,
    ) -> Result<Vec<v1::TypeVersion>, String> {
        let trust_carried = resp.trust.is_some();
        let log_level = resp.listeners.as_ref().map(|l| l.log_level.clone());
        // What the push left as `current` holds it is reused without comparing (the held
        // route bytes, the clusters an endpoint delta did not touch).
        let (resources, unchanged) =
            Resources::merged_unchanged(current.map(|s| &s.resources), resp, endpoint_delta)
                .map_err(|e| e.to_string())?;
        let snapshot = Snapshot::build_after(resources, unchanged, current, &self.metrics)
            .map_err(|e| nack_reason(&e))?;
        let prepared = listeners.prepare(&snapshot).map_err(|e| nack_reason(&e))?;
        let snapshot = Arc::new(snapshot);
        self.store.store(Some(Arc::clone(&snapshot)));
        listeners.commit(prepared, &snapshot);
        if let (Some(store), Some(bundle), true) = (&self.trust, &snapshot.trust, trust_carried) {
            store.set_discovery(bundle);
        }
        if let Some(level) = &log_level {
            crate::log_level::from_control_plane(level);
        }
        Ok(snapshot.resources.type_versions())
    }
}

/// Nice value of the threads that build snapshots where `SCHED_IDLE` is refused (a seccomp
/// profile, say): below the data path's (0).
const BUILD_NICE: i32 = 10;

/// Puts the calling (blocking-pool) thread under `SCHED_IDLE`, once per thread: it then runs
/// only when the data path's threads leave its CPU idle, and the kernel switches to a request
/// thread that wakes up without weighing the builder's slice. At nice 10, request threads were
/// seen waiting up to ~4 ms behind a build of 5,000 services (benches/RESULTS.md, round 5).
/// Under full load a build still progresses (an idle-policy thread gets a small share) and
/// takes longer: the data path comes first. Falls back to nice [`BUILD_NICE`]. On Linux, both
/// act on the calling thread alone.
fn yield_to_the_data_path() {
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadPriority, ThreadSchedulePolicy,
    };
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if LOWERED.with(|l| l.replace(true)) {
        return;
    }
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        tracing::debug!(error = ?e, "SCHED_IDLE refused for the snapshot builder; lowering its nice value");
        if let Err(e) =
            rustix::process::setpriority_process(Some(rustix::thread::gettid()), BUILD_NICE)
        {
            tracing::debug!(error = %e, "could not lower the snapshot builder's priority");
        }
    }
}

/// How long a replaced snapshot is waited for before the control thread lets it go wherever
/// its last holder is.
const RETIRE_WAIT: Duration = Duration::from_secs(5);

/// Releases a replaced snapshot once nothing else holds it: requests in flight when it was
/// replaced hold it, and dropping a snapshot of thousands of services (its clusters, route
/// tables, resource sets) in the last one's task would stall the data path. Checked every 20
/// ms on the control runtime, for at most [`RETIRE_WAIT`], then dropped on a blocking thread
/// under [`yield_to_the_data_path`] (at 5,000 services the drop is ~0.5 ms of freeing, which on
/// the control runtime's own thread delayed request threads sharing its CPU); without a
/// runtime (tests) dropped here.
fn retire(old: Arc<Snapshot>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let deadline = Instant::now() + RETIRE_WAIT;
        while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::task::spawn_blocking(move || {
            yield_to_the_data_path();
            drop(old);
        });
    });
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

/// First delay after a healthy stream ended, and the cap of the delays between attempts.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// A stream open this long is healthy even if it carried no response (a resumed stream whose
/// versions were all current gets none): its end resets the backoff.
const HEALTHY_STREAM: Duration = Duration::from_secs(2);

/// How long opening a stream (connect, TLS, response headers) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How far one attempt got.
#[derive(Debug, Default)]
struct Progress {
    /// The stream opened (the replica answered its headers) at this instant.
    opened: Option<Instant>,
    /// A response arrived on it.
    got_response: bool,
}

impl Progress {
    /// The stream counts as healthy: it carried a response or stayed open [`HEALTHY_STREAM`].
    fn healthy(&self) -> bool {
        self.got_response || self.opened.is_some_and(|at| at.elapsed() >= HEALTHY_STREAM)
    }
}

impl DiscoveryError {
    /// The `weft_control_plane_reconnects_total` reason of an attempt that ended this way.
    fn reason(&self) -> Reason {
        match self {
            DiscoveryError::Connect { .. } | DiscoveryError::NoAddress(_) => Reason::Unreachable,
            DiscoveryError::Stream(_) | DiscoveryError::SendClosed => Reason::StreamError,
            DiscoveryError::Tls(_) => Reason::ConfigError,
        }
    }
}

/// The discovery client.
pub struct Discovery {
    /// The bootstrap's control-plane URLs, in order.
    urls: Vec<String>,
    /// Resolves their hosts (the system resolver; a table in tests).
    lookup: Lookup,
    /// Bootstrap `control_plane_ca`, read at every connect attempt.
    control_plane_ca: Option<PathBuf>,
    /// When set, the first response is applied only once this store holds a certificate.
    wait_for_cert: Option<Arc<CertStore>>,
    node: v1::Node,
    applier: Arc<ConfigApplier>,
    status: Arc<ControlPlaneStatus>,
}

impl Discovery {
    /// A client for the control plane at `url`, announcing `node`.
    pub fn new(url: String, node: v1::Node, applier: ConfigApplier) -> Self {
        Self::with_control_planes(vec![url], node, applier)
    }

    /// A client for the control-plane replicas at `urls` (tried in order, each host's every
    /// address; see [`targets`]), announcing `node`.
    pub fn with_control_planes(urls: Vec<String>, node: v1::Node, applier: ConfigApplier) -> Self {
        let status = Arc::new(ControlPlaneStatus::unregistered(urls.clone()));
        Self {
            urls,
            lookup: targets::system_lookup(),
            control_plane_ca: None,
            wait_for_cert: None,
            node,
            applier: Arc::new(applier),
            status,
        }
    }

    /// Reports the connection in `status` (its metrics registered by the caller).
    #[must_use]
    pub fn with_status(mut self, status: Arc<ControlPlaneStatus>) -> Self {
        self.status = status;
        self
    }

    /// The connection's state and metrics.
    pub fn status(&self) -> &Arc<ControlPlaneStatus> {
        &self.status
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

    /// Runs streams forever: each attempt on the next address, after a backoff delay.
    pub async fn run(self) {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let mut rotation = Rotation::default();
        loop {
            let mut progress = Progress::default();
            let (result, target) = match rotation.next(&self.urls, &self.lookup).await {
                Ok(target) => (self.stream(&target, &mut progress).await, Some(target)),
                Err(e) => (Err(DiscoveryError::NoAddress(e)), None),
            };
            let (url, addr) = target.as_ref().map_or((String::new(), String::new()), |t| {
                (t.url.clone(), t.addr.to_string())
            });
            let reason = match &result {
                Ok(()) => {
                    tracing::info!(%url, %addr, "discovery stream ended by the control plane");
                    self.status.ended(Reason::StreamClosed, None);
                    Reason::StreamClosed
                }
                Err(e) => {
                    let error = ErrorChain(e).to_string();
                    tracing::warn!(%url, %addr, %error, "discovery stream failed");
                    self.status.ended(e.reason(), Some(error));
                    e.reason()
                }
            };
            if progress.healthy() {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::info!(
                reason = reason.as_str(),
                ?delay,
                addresses_left_in_round = rotation.left(),
                "connecting to the next control-plane address"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn stream(&self, target: &Target, progress: &mut Progress) -> Result<(), DiscoveryError> {
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
            discovery_endpoint(&target.url, ca.as_deref(), self.wait_for_cert.clone())
                .map_err(|e| DiscoveryError::Tls(e.to_string()))?;
        let open = async {
            let channel = endpoint
                .connect_with_connector(connector.dialing(target.addr))
                .await
                .map_err(|source| DiscoveryError::Connect {
                    url: target.url.clone(),
                    addr: target.addr,
                    source,
                })?;
            let mut client = DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
            let (tx, rx) = mpsc::channel(8);
            let held = self.applier.held();
            let hello = v1::DiscoveryRequest {
                kind: Some(Kind::Hello(v1::Hello {
                    node: Some(self.node.clone()),
                    held,
                })),
            };
            tx.send(hello)
                .await
                .map_err(|_| DiscoveryError::SendClosed)?;
            let responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
            Ok::<_, DiscoveryError>((tx, responses))
        };
        let (tx, mut responses) =
            tokio::time::timeout(OPEN_TIMEOUT, open)
                .await
                .map_err(|_| {
                    DiscoveryError::Stream(tonic::Status::deadline_exceeded(format!(
                        "the control plane at {} did not open the stream within {OPEN_TIMEOUT:?}",
                        target.addr
                    )))
                })??;
        progress.opened = Some(Instant::now());
        self.status.opened(target);
        tracing::info!(url = %target.url, addr = %target.addr, held = self.applier.held().len(), "discovery stream open");
        while let Some(resp) = responses.message().await? {
            progress.got_response = true;
            // The build is CPU work of up to hundreds of milliseconds at thousands of
            // services: off this runtime's thread, which also serves the admin port and runs
            // health checks and DNS refreshes. Responses are still applied one at a time.
            let applier = Arc::clone(&self.applier);
            let reply = tokio::task::spawn_blocking(move || {
                yield_to_the_data_path();
                applier.apply_owned(resp)
            })
            .await
            .map_err(|e| {
                DiscoveryError::Stream(tonic::Status::internal(format!(
                    "applying a discovery response failed: {e}"
                )))
            })?;
            tx.send(reply)
                .await
                .map_err(|_| DiscoveryError::SendClosed)?;
        }
        Ok(())
    }
}
