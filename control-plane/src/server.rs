//! Assembles the control plane: binds the gRPC and admin listeners, loads the policy store,
//! loads or creates the CA (with `--ca-dir`), restores the persisted registry (`--state-dir`),
//! starts the watcher, the registry sweeper and the registry writer, and serves until shutdown: Discovery, Identity, health and reflection on the gRPC port (over TLS
//! with `--grpc-tls`), the admin API on the admin port.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use weft_proto::v1::discovery_server::DiscoveryServer;
use weft_proto::v1::identity_server::IdentityServer;

use crate::ca::{Ca, CaConfig, CaError};
use crate::discovery::DiscoveryService;
use crate::identity::IdentityService;
use crate::metrics::{Metrics, MetricsError};
use crate::persist::StateStore;
use crate::policy::PolicyStore;
use crate::state::ControlPlane;
use crate::tls::{ServerTls, TlsError};

/// How often expired registrations are swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Default `--deregister-grace`.
pub const DEFAULT_DEREGISTER_GRACE: Duration = Duration::from_secs(5);

/// Default `--restart-grace`: longer than the proxies' longest reconnect backoff (5 s).
pub const DEFAULT_RESTART_GRACE: Duration = Duration::from_secs(15);

/// Settings of one control plane.
#[derive(Debug, Clone)]
pub struct Config {
    pub policies: PathBuf,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub deregister_grace: Duration,
    /// How long a push may stay unanswered before it is considered lost (see `discovery`).
    pub push_timeout: Duration,
    /// Where the registry is persisted (`registry.json`); `None`:
    /// [`crate::persist::default_state_dir`] of `policies` (`<policies>/.weft-state`).
    pub state_dir: Option<PathBuf>,
    /// How long registrations restored from the state dir are kept for their proxies to
    /// reconnect after a restart.
    pub restart_grace: Duration,
}

impl Config {
    /// `policies` with the defaults: the binary's default addresses and durations, the state
    /// dir inside `policies`.
    pub fn new(policies: impl Into<PathBuf>) -> Self {
        Self {
            policies: policies.into(),
            grpc: SocketAddr::from(([127, 0, 0, 1], 15010)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15011)),
            deregister_grace: DEFAULT_DEREGISTER_GRACE,
            push_timeout: crate::state::DEFAULT_PUSH_TIMEOUT,
            state_dir: None,
            restart_grace: DEFAULT_RESTART_GRACE,
        }
    }

    /// The state directory in effect.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| crate::persist::default_state_dir(&self.policies))
    }
}

/// The CA, Identity and gRPC TLS settings (`--ca-dir` and friends).
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub ca: CaConfig,
    /// Serve the gRPC port over TLS with a certificate from the CA.
    pub grpc_tls: bool,
    /// More DNS names / IPs for the gRPC server certificate (`--tls-san`).
    pub tls_sans: Vec<String>,
}

impl IdentityConfig {
    /// A CA in `ca_dir` with the defaults, plaintext gRPC.
    pub fn new(ca_dir: impl Into<PathBuf>) -> Self {
        Self {
            ca: CaConfig::new(ca_dir),
            grpc_tls: false,
            tls_sans: Vec::new(),
        }
    }
}

/// How often the CA's expiry is checked (warning logged, gauge set).
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Errors starting or running the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("policy directory {0}: not a directory (create it first)")]
    NoPolicyDir(PathBuf),
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("watching the policy directory: {0}")]
    Watch(#[from] notify::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A control plane whose listeners are bound and whose initial policy set is loaded.
#[derive(Debug)]
pub struct Server {
    cp: Arc<ControlPlane>,
    grpc: TcpListener,
    admin: TcpListener,
    ca: Option<Arc<Ca>>,
    tls: Option<Arc<ServerTls>>,
    _watcher: notify::RecommendedWatcher,
}

impl Server {
    /// Binds both listeners and loads the store (an invalid store starts empty, with the
    /// error reported by `/v1/policies` and `weft_control_policy_errors`).
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        Self::bind_with(config, None).await
    }

    /// [`Server::bind`] with a CA (Identity.Certify, trust bundle, optional gRPC TLS). Without
    /// one, Certify answers `FailedPrecondition` and gRPC is plaintext.
    pub async fn bind_with(
        config: Config,
        identity: Option<IdentityConfig>,
    ) -> Result<Self, ServeError> {
        if !config.policies.is_dir() {
            return Err(ServeError::NoPolicyDir(config.policies));
        }
        let metrics = Metrics::new()?;
        let state_dir = config.state_dir();
        let cp = Arc::new(
            ControlPlane::new(
                PolicyStore::new(&config.policies),
                config.deregister_grace,
                metrics,
            )
            .with_push_timeout(config.push_timeout)
            .with_state_store(StateStore::new(&state_dir)),
        );
        // Before serving: the first proxy to reconnect must see every registration.
        let restart_grace = config.restart_grace;
        let restore_cp = Arc::clone(&cp);
        let restored =
            tokio::task::spawn_blocking(move || restore_cp.restore_registry(restart_grace))
                .await
                .expect("restoring the registry panicked");
        tracing::debug!(dir = %state_dir.display(), restored, "registry state directory");
        // Watch before the first load so no change in between is missed.
        let watcher = crate::watch::spawn_watcher(Arc::clone(&cp))?;
        if cp.reload().await.is_err() {
            tracing::error!(
                dir = %config.policies.display(),
                "the initial policy set is invalid: serving an empty set until it is fixed"
            );
        }
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { what, addr, source })
        };
        let grpc = bind("gRPC", config.grpc).await?;
        let admin = bind("admin", config.admin).await?;
        let (ca, tls) = match identity {
            None => (None, None),
            Some(identity) => {
                let ca_config = identity.ca;
                let ca = Arc::new(
                    tokio::task::spawn_blocking(move || Ca::load_or_create(&ca_config))
                        .await
                        .expect("CA loading panicked")?,
                );
                check_expiry(&cp, &ca);
                push_trust(&cp, &ca);
                let tls = if identity.grpc_tls {
                    let listen = grpc.local_addr().unwrap_or(config.grpc);
                    Some(Arc::new(ServerTls::new(
                        Arc::clone(&ca),
                        listen,
                        &identity.tls_sans,
                    )?))
                } else {
                    None
                };
                (Some(ca), tls)
            }
        };
        Ok(Self {
            cp,
            grpc,
            admin,
            ca,
            tls,
            _watcher: watcher,
        })
    }

    pub fn control_plane(&self) -> &Arc<ControlPlane> {
        &self.cp
    }

    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The CA (with [`Server::bind_with`] and an [`IdentityConfig`]).
    pub fn ca(&self) -> Option<&Arc<Ca>> {
        self.ca.as_ref()
    }

    /// Whether the gRPC port speaks TLS.
    pub fn grpc_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Self {
            cp,
            grpc,
            admin,
            ca,
            tls,
            _watcher,
        } = self;

        let expiry_task = ca.clone().map(|ca| {
            let cp = Arc::clone(&cp);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
                tick.tick().await; // the first tick is immediate: bind already checked
                loop {
                    tick.tick().await;
                    check_expiry(&cp, &ca);
                }
            })
        });
        let rotation_task = tls.clone().map(|tls| tokio::spawn(tls.rotate_forever()));

        let sweeper_cp = Arc::clone(&cp);
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sweeper_cp.expire_registrations();
            }
        });
        let state_writer = tokio::spawn(crate::persist::write_registry_forever(Arc::clone(&cp)));

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<DiscoveryServer<DiscoveryService>>()
            .await;
        health_reporter
            .set_serving::<IdentityServer<IdentityService>>()
            .await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(weft_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        tracing::info!(
            grpc = %grpc.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            admin = %admin.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            grpc_tls = tls.is_some(),
            ca = ?ca.as_ref().map(|ca| ca.dir().display().to_string()),
            policies = %cp.store().dir().display(),
            version = cp.policy().version(),
            "weft-control listening"
        );
        let admin_task = tokio::spawn(crate::admin::serve(
            admin,
            Arc::clone(&cp),
            stopped(stop_rx.clone()),
        ));
        let router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(DiscoveryServer::new(DiscoveryService::new(Arc::clone(&cp))))
            .add_service(IdentityServer::new(IdentityService::new(
                ca,
                cp.metrics().clone(),
            )));
        let grpc_task = match &tls {
            Some(tls) => tokio::spawn(
                router.serve_with_incoming_shutdown(tls.incoming(grpc), stopped(stop_rx)),
            ),
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stopped(stop_rx)),
            ),
        };
        shutdown.await;
        tracing::info!("shutting down");
        // Persist the registry as it is (proxies connected) before the streams close: their
        // ends are our shutdown, not the proxies going away.
        sweeper.abort();
        state_writer.abort();
        let closing = Arc::clone(&cp);
        let _ = tokio::task::spawn_blocking(move || closing.close_state()).await;
        let _ = stop_tx.send(true);
        for task in [expiry_task, rotation_task].into_iter().flatten() {
            task.abort();
        }
        let _ = admin_task.await;
        // Open discovery streams would keep a graceful gRPC shutdown waiting forever.
        if let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(2), grpc_task).await {
            result?;
        }
        Ok(())
    }
}

/// Logs a warning when the CA's issuer expires within 30 days (an error once expired) and sets
/// `weft_control_issuer_expiry_timestamp_seconds`.
fn check_expiry(cp: &ControlPlane, ca: &Ca) {
    let not_after = ca.issuer_not_after();
    cp.metrics()
        .issuer_expiry_timestamp_seconds
        .set(not_after.unix_timestamp());
    let now = time::OffsetDateTime::now_utc();
    if let Some(warning) = ca.expiry_warning(now) {
        if not_after <= now {
            tracing::error!(not_after = %crate::ca::rfc3339(not_after), "{warning}");
        } else {
            tracing::warn!(not_after = %crate::ca::rfc3339(not_after), "{warning}");
        }
    }
}

/// Hands the CA's trust bundle to the state, which pushes it to every proxy.
pub fn push_trust(cp: &ControlPlane, ca: &Ca) {
    let trust = ca.trust();
    cp.set_trust(crate::compile::TrustBundle {
        trust_domain: trust.trust_domain,
        roots_pem: trust.roots_pem,
    });
}

/// Re-reads the `--extra-root` files (SIGHUP); on a change rewrites `roots.pem` and pushes the
/// new bundle. Errors keep the previous bundle.
pub fn reload_trust(cp: &ControlPlane, ca: &Ca) {
    match ca.reload_extra_roots() {
        Ok(true) => {
            tracing::info!(
                roots = ca.roots_pem().len(),
                "the trust bundle changed: pushing it"
            );
            push_trust(cp, ca);
        }
        Ok(false) => tracing::info!("trust bundle reloaded: unchanged"),
        Err(e) => tracing::error!("reloading the extra roots (keeping the previous bundle): {e}"),
    }
}
