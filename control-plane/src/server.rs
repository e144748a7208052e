//! Assembles the control plane: binds the gRPC and admin listeners, opens the store backend
//! ([`crate::store`]) and loads its policies, loads or creates the CA (with `--ca-dir`), restores
//! the persisted registry, starts the watcher, the registry sweeper and the store's registry
//! sync, and serves until shutdown: Discovery, Identity, health and reflection on the gRPC port
//! (over TLS with `--grpc-tls`), the admin API on the admin port.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use weft_proto::v1::discovery_server::DiscoveryServer;
use weft_proto::v1::identity_server::IdentityServer;

use crate::admin::auth::AdminAuth;
use crate::ca::{Ca, CaConfig, CaError};
use crate::discovery::{DiscoveryService, RegistrationAuth};
use crate::identity::IdentityService;
use crate::metrics::{Metrics, MetricsError};
use crate::state::ControlPlane;
use crate::store::etcd::ca::{CaCheck, CaFingerprint};
use crate::store::{EtcdConfig, EtcdStore, FileStore, SharedStore, StoreError, WatchGuard};
use crate::tls::{plain_incoming, ConnectionSlots, ServerTls, TlsError};

/// How often expired registrations are swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Default `--deregister-grace`.
pub const DEFAULT_DEREGISTER_GRACE: Duration = Duration::from_secs(5);

/// Default `--restart-grace` (defined with the state it configures).
pub use crate::state::DEFAULT_RESTART_GRACE;

/// Default `--grpc-max-connections`.
pub const DEFAULT_GRPC_MAX_CONNECTIONS: usize = 16_384;

/// Default `--grpc-max-streams`: a proxy uses one stream at a time per connection.
pub const DEFAULT_GRPC_MAX_STREAMS: u32 = 128;

/// Default `--admin-max-connections`.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 256;

/// Largest gRPC message the control plane accepts (Hello, Ack/Nack, CSR).
const MAX_GRPC_MESSAGE: usize = 1 << 20;

/// Where the policies and the registry live.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// One replica: the policy directory ([`Config::policies`]) and `registry.json` in the state
    /// directory.
    #[default]
    Files,
    /// Several replicas sharing etcd.
    Etcd(Box<EtcdConfig>),
}

/// Settings of one control plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// The policy directory (file store).
    pub policies: PathBuf,
    /// The store backend.
    pub store: StoreConfig,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub deregister_grace: Duration,
    /// How long a push may stay unanswered before it is considered lost (see `discovery`).
    pub push_timeout: Duration,
    /// How long a stream waits after a change before compiling (a burst becomes one push).
    pub push_debounce: Duration,
    /// Where the registry is persisted (`registry.json`); `None`:
    /// [`crate::persist::default_state_dir`] of `policies` (`<policies>/.weft-state`).
    pub state_dir: Option<PathBuf>,
    /// How long registrations restored from the state dir are kept for their proxies to
    /// reconnect after a restart.
    pub restart_grace: Duration,
    /// Bounds on registrations and the Hello deadline.
    pub limits: crate::admission::Limits,
    /// Most open gRPC connections (each proxy holds one or two).
    pub grpc_max_connections: usize,
    /// Most concurrent HTTP/2 streams per gRPC connection.
    pub grpc_max_streams: u32,
    /// Most open admin API connections.
    pub admin_max_connections: usize,
    /// Serve the admin API in plaintext without authentication (`--insecure-admin`): only on a
    /// loopback address. Without a CA there is no choice: the admin API is plaintext and open,
    /// and the same loopback rule applies.
    pub insecure_admin: bool,
    /// `--admin-tokens` files (`<name> <read|write> <token>` lines).
    pub admin_token_files: Vec<PathBuf>,
    /// Write and accept the bootstrap admin token (`<ca-dir>/admin-token`).
    pub admin_bootstrap_token: bool,
}

impl Config {
    /// `policies` with the defaults: the binary's default addresses and durations, the state
    /// dir inside `policies`.
    pub fn new(policies: impl Into<PathBuf>) -> Self {
        Self {
            policies: policies.into(),
            store: StoreConfig::Files,
            grpc: SocketAddr::from(([127, 0, 0, 1], 15010)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15011)),
            deregister_grace: DEFAULT_DEREGISTER_GRACE,
            push_timeout: crate::state::DEFAULT_PUSH_TIMEOUT,
            push_debounce: crate::state::DEFAULT_PUSH_DEBOUNCE,
            state_dir: None,
            restart_grace: DEFAULT_RESTART_GRACE,
            limits: crate::admission::Limits::default(),
            grpc_max_connections: DEFAULT_GRPC_MAX_CONNECTIONS,
            grpc_max_streams: DEFAULT_GRPC_MAX_STREAMS,
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            insecure_admin: false,
            admin_token_files: Vec::new(),
            admin_bootstrap_token: true,
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
    /// Also certify projected Kubernetes ServiceAccount tokens (`--k8s-jwks` and friends).
    pub kubernetes_tokens: Option<Arc<crate::token::kubernetes::KubernetesTokens>>,
}

impl IdentityConfig {
    /// A CA in `ca_dir` with the defaults, plaintext gRPC.
    pub fn new(ca_dir: impl Into<PathBuf>) -> Self {
        Self {
            ca: CaConfig::new(ca_dir),
            grpc_tls: false,
            tls_sans: Vec::new(),
            kubernetes_tokens: None,
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
    #[error(transparent)]
    Store(#[from] StoreError),
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
    #[error("admin credentials: {0}")]
    AdminAuth(#[from] crate::admin::auth::AuthError),
    #[error("refusing to serve the admin API on {0} without authentication: bind a loopback address, or drop --insecure-admin (and run with a CA)")]
    OpenAdmin(SocketAddr),
    #[error("refusing to start: {0}")]
    CaMismatch(String),
}

/// A control plane whose listeners are bound and whose initial policy set is loaded.
#[derive(Debug)]
pub struct Server {
    cp: Arc<ControlPlane>,
    grpc: TcpListener,
    admin: TcpListener,
    ca: Option<Arc<Ca>>,
    /// The CA-issued server certificate; gRPC is TLS when `grpc_tls`.
    tls: Option<Arc<ServerTls>>,
    grpc_tls: bool,
    admin_tls: bool,
    admin_auth: Arc<AdminAuth>,
    config: Config,
    kubernetes_tokens: Option<Arc<crate::token::kubernetes::KubernetesTokens>>,
    _watcher: WatchGuard,
}

/// Re-reads what SIGHUP re-reads: the extra roots (a changed trust bundle is pushed to every
/// proxy and verifies client certificates from the next handshake) and the admin tokens.
#[derive(Debug, Clone)]
pub struct Reloader {
    cp: Arc<ControlPlane>,
    ca: Option<Arc<Ca>>,
    tls: Option<Arc<ServerTls>>,
    admin_auth: Arc<AdminAuth>,
}

impl Reloader {
    /// Reloads; errors are logged and keep what was in force.
    pub fn reload(&self) {
        if let Some(ca) = &self.ca {
            reload_trust(&self.cp, ca, self.tls.as_deref());
        }
        if self.admin_auth.is_required() {
            match self.admin_auth.reload() {
                Ok(n) => tracing::info!(tokens = n, "admin tokens reloaded"),
                Err(e) => {
                    tracing::error!("reloading the admin tokens (keeping the previous ones): {e}")
                }
            }
        }
    }
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
        let metrics = Metrics::new()?;
        let (store, etcd): (SharedStore, Option<Arc<EtcdStore>>) = match &config.store {
            StoreConfig::Files => {
                if !config.policies.is_dir() {
                    return Err(ServeError::NoPolicyDir(config.policies));
                }
                let state_dir = config.state_dir();
                tracing::debug!(dir = %state_dir.display(), "registry state directory");
                (Arc::new(FileStore::new(&config.policies, &state_dir)), None)
            }
            StoreConfig::Etcd(etcd) => {
                let etcd = Arc::new(EtcdStore::connect((**etcd).clone()).await?);
                etcd.wait_ready().await?;
                (Arc::clone(&etcd) as SharedStore, Some(etcd))
            }
        };
        let cp = Arc::new(
            ControlPlane::new(Arc::clone(&store), config.deregister_grace, metrics)
                .with_push_timeout(config.push_timeout)
                .with_push_debounce(config.push_debounce)
                .with_limits(config.limits.clone())
                .with_restart_grace(config.restart_grace),
        );
        // Before serving: the first proxy to reconnect must see every registration.
        store.load_registrations(Arc::clone(&cp) as _).await?;
        // Watch before the first load so no change in between is missed.
        let watcher = crate::watch::spawn_watcher(Arc::clone(&cp))?;
        if cp.reload().await.is_err() {
            tracing::error!(
                store = %store.describe(),
                "the initial policy set is invalid: serving an empty set until it is fixed"
            );
        }
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { what, addr, source })
        };
        let open_admin = identity.is_none() || config.insecure_admin;
        if open_admin && !config.admin.ip().is_loopback() {
            return Err(ServeError::OpenAdmin(config.admin));
        }
        let grpc = bind("gRPC", config.grpc).await?;
        let admin = bind("admin", config.admin).await?;
        let grpc_tls = identity.as_ref().is_some_and(|i| i.grpc_tls);
        let kubernetes_tokens = identity.as_ref().and_then(|i| i.kubernetes_tokens.clone());
        let (ca, tls) = match identity {
            None => (None, None),
            Some(identity) => {
                let ca_config = identity.ca;
                let ca = Arc::new(
                    tokio::task::spawn_blocking(move || Ca::load_or_create(&ca_config))
                        .await
                        .expect("CA loading panicked")?,
                );
                if let Some(etcd) = &etcd {
                    check_shared_ca(etcd, &ca).await?;
                }
                check_expiry(&cp, &ca);
                push_trust(&cp, &ca);
                let tls = if identity.grpc_tls || !config.insecure_admin {
                    let listen = grpc.local_addr().unwrap_or(config.grpc);
                    let mut sans = identity.tls_sans.clone();
                    // The admin API shares the certificate: name its address too.
                    let admin_ip = admin.local_addr().unwrap_or(config.admin).ip();
                    if !admin_ip.is_unspecified() {
                        sans.push(admin_ip.to_string());
                    }
                    Some(Arc::new(ServerTls::new(Arc::clone(&ca), listen, &sans)?))
                } else {
                    None
                };
                (Some(ca), tls)
            }
        };
        let admin_auth = match &ca {
            Some(ca) if !config.insecure_admin => {
                let bootstrap = if config.admin_bootstrap_token {
                    Some(crate::admin::auth::ensure_bootstrap_token(ca.dir())?)
                } else {
                    None
                };
                Arc::new(AdminAuth::new(
                    &ca.trust().trust_domain,
                    config.admin_token_files.clone(),
                    bootstrap,
                )?)
            }
            _ => Arc::new(AdminAuth::disabled()),
        };
        let admin_tls = tls.is_some() && admin_auth.is_required();
        Ok(Self {
            cp,
            grpc,
            admin,
            ca,
            tls,
            grpc_tls,
            admin_tls,
            admin_auth,
            config,
            kubernetes_tokens,
            _watcher: watcher,
        })
    }

    /// What SIGHUP reloads.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            cp: Arc::clone(&self.cp),
            ca: self.ca.clone(),
            tls: self.tls.clone(),
            admin_auth: Arc::clone(&self.admin_auth),
        }
    }

    /// Whether the admin API speaks TLS and requires credentials.
    pub fn admin_secured(&self) -> bool {
        self.admin_tls
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

    /// Whether the gRPC port speaks TLS (and so authenticates registrations).
    pub fn grpc_tls(&self) -> bool {
        self.grpc_tls
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
            grpc_tls,
            admin_tls,
            admin_auth,
            config,
            kubernetes_tokens,
            _watcher,
        } = self;
        if !grpc_tls {
            warn_insecure_grpc();
        }

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
        let store = Arc::clone(cp.store());
        let state_writer = {
            let (store, host) = (Arc::clone(&store), Arc::clone(&cp));
            tokio::spawn(async move { store.sync_registrations(host).await })
        };

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
            grpc_tls,
            admin_tls,
            ca = ?ca.as_ref().map(|ca| ca.dir().display().to_string()),
            store = %store.describe(),
            version = cp.policy().version(),
            "weft-control listening"
        );
        let refused = |server: &str| {
            cp.metrics()
                .connections_refused_total
                .with_label_values(&[server])
        };
        let admin_server = crate::admin::AdminServer {
            tls: tls
                .as_ref()
                .filter(|_| admin_tls)
                .map(|t| t.admin_acceptor()),
            auth: admin_auth,
            slots: ConnectionSlots::new("admin", config.admin_max_connections, refused("admin")),
        };
        let admin_task = tokio::spawn(crate::admin::serve(
            admin,
            Arc::clone(&cp),
            admin_server,
            stopped(stop_rx.clone()),
        ));
        let auth = match (&ca, grpc_tls) {
            (Some(ca), true) => RegistrationAuth::Svid {
                trust_domain: ca.trust().trust_domain,
            },
            _ => RegistrationAuth::Insecure,
        };
        let router = tonic::transport::Server::builder()
            // A proxy needs one stream at a time; an attacker's connection gets no more.
            .max_concurrent_streams(config.grpc_max_streams)
            // h2's rapid-reset defence, explicit rather than inherited.
            .http2_max_pending_accept_reset_streams(Some(20))
            .http2_max_header_list_size(16 << 10)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .add_service(health)
            .add_service(reflection)
            .add_service(
                DiscoveryServer::new(DiscoveryService::new(Arc::clone(&cp), auth))
                    .max_decoding_message_size(MAX_GRPC_MESSAGE),
            )
            .add_service(
                IdentityServer::new(
                    IdentityService::new(ca, cp.metrics().clone())
                        .with_kubernetes_tokens(kubernetes_tokens),
                )
                .max_decoding_message_size(MAX_GRPC_MESSAGE),
            );
        let slots = ConnectionSlots::new("grpc", config.grpc_max_connections, refused("grpc"));
        let grpc_task = match tls.as_ref().filter(|_| grpc_tls) {
            Some(tls) => tokio::spawn(
                router.serve_with_incoming_shutdown(tls.incoming(grpc, slots), stopped(stop_rx)),
            ),
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(plain_incoming(grpc, slots), stopped(stop_rx)),
            ),
        };
        shutdown.await;
        tracing::info!("shutting down");
        // Persist the registry as it is (proxies connected) before the streams close: their
        // ends are our shutdown, not the proxies going away.
        sweeper.abort();
        state_writer.abort();
        store.close_registrations(Arc::clone(&cp) as _).await;
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

/// With several replicas: records this replica's CA in etcd if it is the first, else refuses
/// to start unless it is the CA the others share (see [`crate::store::etcd::ca`]).
async fn check_shared_ca(etcd: &EtcdStore, ca: &Ca) -> Result<(), ServeError> {
    let fingerprint = CaFingerprint::of(ca).map_err(ServeError::CaMismatch)?;
    match etcd.check_ca(&fingerprint).await? {
        CaCheck::Recorded => tracing::info!(
            root_sha256 = %fingerprint.root_sha256,
            "recorded this replica's CA as the one every replica must share"
        ),
        CaCheck::Same { replica } => tracing::info!(
            root_sha256 = %fingerprint.root_sha256,
            recorded_by = %replica,
            "this replica's CA is the one the replicas share"
        ),
        CaCheck::Differs(message) => return Err(ServeError::CaMismatch(message)),
    }
    Ok(())
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

/// What `--insecure-grpc` gives up, said at start so nobody runs it by accident.
fn warn_insecure_grpc() {
    tracing::warn!(
        "INSECURE: the gRPC port is plaintext (--insecure-grpc). Registrations are NOT \
         authenticated: anyone who reaches the port can register an endpoint for any service \
         and receive its callers' requests; join tokens and certificates cross the network in \
         the clear; proxies cannot tell this control plane from an impostor. Development only."
    );
}

/// Re-reads the `--extra-root` files (SIGHUP); on a change rewrites `roots.pem`, pushes the
/// new bundle and verifies client certificates with it. Errors keep the previous bundle.
pub fn reload_trust(cp: &ControlPlane, ca: &Ca, tls: Option<&ServerTls>) {
    match ca.reload_extra_roots() {
        Ok(true) => {
            tracing::info!(
                roots = ca.roots_pem().len(),
                "the trust bundle changed: pushing it"
            );
            push_trust(cp, ca);
            if let Some(tls) = tls {
                if let Err(e) = tls.set_roots(&ca.roots_pem()) {
                    tracing::error!("verifying client certificates with the new bundle: {e}");
                }
            }
        }
        Ok(false) => tracing::info!("trust bundle reloaded: unchanged"),
        Err(e) => tracing::error!("reloading the extra roots (keeping the previous bundle): {e}"),
    }
}
