//! Assembles the control plane: binds the gRPC and admin listeners, loads the policy store,
//! starts the watcher and the registry sweeper, and serves until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use weft_proto::v1::discovery_server::DiscoveryServer;

use crate::discovery::DiscoveryService;
use crate::metrics::{Metrics, MetricsError};
use crate::policy::PolicyStore;
use crate::state::ControlPlane;

/// How often expired registrations are swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Settings of one control plane.
#[derive(Debug, Clone)]
pub struct Config {
    pub policies: PathBuf,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub deregister_grace: Duration,
    /// How long a push may stay unanswered before it is considered lost (see `discovery`).
    pub push_timeout: Duration,
}

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
}

/// A control plane whose listeners are bound and whose initial policy set is loaded.
#[derive(Debug)]
pub struct Server {
    cp: Arc<ControlPlane>,
    grpc: TcpListener,
    admin: TcpListener,
    _watcher: notify::RecommendedWatcher,
}

impl Server {
    /// Binds both listeners and loads the store (an invalid store starts empty, with the
    /// error reported by `/v1/policies` and `weft_control_policy_errors`).
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        if !config.policies.is_dir() {
            return Err(ServeError::NoPolicyDir(config.policies));
        }
        let metrics = Metrics::new()?;
        let cp = Arc::new(
            ControlPlane::new(
                PolicyStore::new(&config.policies),
                config.deregister_grace,
                metrics,
            )
            .with_push_timeout(config.push_timeout),
        );
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
        Ok(Self {
            cp,
            grpc,
            admin,
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
            _watcher,
        } = self;

        let sweeper_cp = Arc::clone(&cp);
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sweeper_cp.expire_registrations();
            }
        });

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<DiscoveryServer<DiscoveryService>>()
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
            policies = %cp.store().dir().display(),
            version = cp.policy().version(),
            "weft-control listening"
        );
        let admin_task = tokio::spawn(crate::admin::serve(
            admin,
            Arc::clone(&cp),
            stopped(stop_rx.clone()),
        ));
        let grpc_server = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(DiscoveryServer::new(DiscoveryService::new(Arc::clone(&cp))))
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stopped(stop_rx));

        let grpc_task = tokio::spawn(grpc_server);
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        sweeper.abort();
        let _ = admin_task.await;
        // Open discovery streams would keep a graceful gRPC shutdown waiting forever.
        if let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(2), grpc_task).await {
            result?;
        }
        Ok(())
    }
}
