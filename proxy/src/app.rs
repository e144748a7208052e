//! Process assembly: the data-path runtime (`worker_threads` workers), the control thread
//! (single-threaded runtime running the discovery client, the admin server, and the resolver of
//! endpoints declared by DNS name with its snapshot refresher), and shutdown on SIGTERM/SIGINT.
//!
//! Nothing but the admin port is bound until the first snapshot arrives: listeners come from the
//! snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use weft_proto::v1;

use crate::admin::{self, AdminState, Surface};
use crate::config::Bootstrap;
use crate::discovery::status::ControlPlaneStatus;
use crate::discovery::{control_endpoint_from_file, ConfigApplier, Discovery};
use crate::listen::{self, DataPlane, ListenerManager};
use crate::metrics::{Metrics, MetricsError};
use crate::snapshot::SnapshotStore;
use crate::tls::renew::{CertifyParams, ChannelFactory, Renewer, TokenSource};
use crate::tls::{self, MeshTls};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Building a tokio runtime failed.
    #[error("starting the {which} runtime: {source}")]
    Runtime {
        /// "data" or "control".
        which: &'static str,
        /// I/O error from tokio.
        source: std::io::Error,
    },
    /// The admin address could not be bound.
    #[error("admin: cannot bind {addr}: {source}")]
    AdminBind {
        /// The bootstrap `admin` address.
        addr: std::net::SocketAddr,
        /// I/O error.
        source: std::io::Error,
    },
    /// The status address could not be bound.
    #[error("status: cannot bind {addr}: {source}")]
    StatusBind {
        /// The bootstrap `status` address.
        addr: std::net::SocketAddr,
        /// I/O error.
        source: std::io::Error,
    },
    /// Metrics registration failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The access log or the span exporter could not be started.
    #[error(transparent)]
    Observe(#[from] crate::observe::ObserveError),
    /// Spawning the control thread failed.
    #[error("spawning the control thread: {0}")]
    Thread(std::io::Error),
    /// The mTLS configuration could not be built.
    #[error("TLS setup: {0}")]
    Tls(rustls::Error),
    /// The resolver of endpoints declared by DNS name could not be built.
    #[error(transparent)]
    Dns(#[from] crate::egress::resolver::ResolverError),
    /// The mesh DNS server (transparent mode) could not start.
    #[error(transparent)]
    MeshDns(#[from] crate::dns::DnsError),
}

/// The node identity announced to the control plane.
pub fn node(b: &Bootstrap) -> v1::Node {
    v1::Node {
        id: b.node_id(),
        service: b.node.service.clone(),
        namespace: b.node.namespace.clone(),
        labels: b.node.labels.clone().into_iter().collect(),
        inbound_address: b.inbound.address.to_string(),
        outbound_address: b.outbound.address.to_string(),
        app_address: b.inbound.app.to_string(),
        tcp_bind_ip: b.outbound.tcp_bind_ip.to_string(),
        build_version: env!("CARGO_PKG_VERSION").to_owned(),
        instance_ip: b
            .transparent
            .as_ref()
            .map(|t| t.instance_ip.to_string())
            .unwrap_or_default(),
        app_ports: b
            .transparent
            .as_ref()
            .map(|t| t.app_ports.iter().map(|p| u32::from(*p)).collect())
            .unwrap_or_default(),
        capabilities: vec![crate::discovery::delta::CAPABILITY.to_owned()],
    }
}

/// The data-path runtime with `worker_threads` workers.
///
/// One worker gets a current-thread runtime: it runs on the thread that calls `block_on` (the
/// main thread, for the whole life of the process), without the work-stealing machinery (shared
/// run queues, atomics, a separate idle main thread) that buys nothing with a single worker.
/// Tasks spawned from other threads through its [`tokio::runtime::Handle`] (the control thread
/// starting listeners) are queued to it and run there.
pub fn data_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .thread_name("weft-data")
            .build()
    }
}

/// How long shutdown waits for queued access log lines and spans to be written / exported.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// Runs the proxy until SIGTERM/SIGINT, then drains and returns.
pub fn run(bootstrap: &Bootstrap) -> Result<(), StartError> {
    let workers = bootstrap.worker_threads();
    let data_rt = data_runtime(workers).map_err(|source| StartError::Runtime {
        which: "data",
        source,
    })?;
    let metrics = Metrics::new()?;
    let observability = crate::observe::Observability::start(
        &bootstrap.observability,
        &crate::observe::NodeInfo {
            service: bootstrap.node.service.clone(),
            namespace: bootstrap.node.namespace.clone(),
            id: bootstrap.node_id(),
        },
        metrics.registry(),
    )?;
    crate::observe::install(observability);
    crate::http::tunnel_metrics::register(metrics.registry())?;
    let transparent = Arc::new(crate::transparent::Transparent::new(
        crate::transparent::metrics::DetectionMetrics::register(metrics.registry())?,
    ));
    let store: Arc<SnapshotStore> = Arc::new(SnapshotStore::empty());
    // Transparent mode's mesh DNS, on its own thread: bound now, so a port conflict stops the
    // proxy (the capture rules send the namespace's DNS there); names come with the snapshots.
    if let Some(t) = bootstrap.transparent.as_ref().filter(|t| t.dns.enabled) {
        crate::dns::start(
            &t.dns,
            &bootstrap.node.namespace,
            Arc::clone(&store),
            metrics.registry(),
        )?;
    }
    let mut mesh_tls = MeshTls::new(metrics.security.clone()).map_err(StartError::Tls)?;
    if !bootstrap.tunnel.enabled {
        // Peers' tunnel handshakes fail for lack of a common ALPN: they dial us directly.
        mesh_tls = mesh_tls.without_tunnel_alpn().map_err(StartError::Tls)?;
    }
    let mesh_tls = Arc::new(mesh_tls);
    let tunnel_metrics = crate::tunnel::metrics::TunnelMetrics::register(metrics.registry())
        .map_err(|source| {
            StartError::Metrics(crate::metrics::MetricsError::Register {
                name: "weft_tunnel_connections",
                source,
            })
        })?;
    crate::tunnel::metrics::install(tunnel_metrics.clone());
    let token = bootstrap
        .join_token
        .clone()
        .map(TokenSource::Inline)
        .or_else(|| bootstrap.join_token_file.clone().map(TokenSource::File));
    tls::install_refusal_metrics(metrics.security.origination_refused());
    tls::install_handshake_metrics(&metrics.security);
    let dns_metrics = crate::egress::metrics::DnsMetrics::register(metrics.registry())?;
    if token.is_some() {
        // This proxy has a mesh identity: mesh endpoints are dialled with mTLS.
        tls::install_origination(Arc::clone(&mesh_tls));
        if bootstrap.tunnel.enabled {
            crate::tunnel::install(Arc::clone(&mesh_tls), &bootstrap.tunnel, tunnel_metrics);
        }
    } else {
        tracing::warn!("no join_token: running without a mesh identity: calls to mesh endpoints that expect mTLS are refused (503), only plaintext endpoints outside the mesh and mtls: disabled services can be called, and the control plane must run with --insecure-grpc to accept this proxy");
    }
    let connection_limits = crate::conn_limit::RefusalMetrics::register(metrics.registry())
        .map_err(|source| {
            StartError::Metrics(crate::metrics::MetricsError::Register {
                name: "weft_listener_connections_refused_total",
                source,
            })
        })?;
    let plane = DataPlane {
        store: Arc::clone(&store),
        drain_timeout: bootstrap.drain_timeout,
        http: Arc::new(crate::http::server_builder()),
        tls: Arc::clone(&mesh_tls),
        limits: connection_limits.clone(),
        max_connections: bootstrap.limits.max_connections_per_listener,
        transparent,
    };
    let listeners = Arc::new(Mutex::new(ListenerManager::new(
        data_rt.handle().clone(),
        plane,
    )));
    let node = node(bootstrap);
    tracing::info!(id = %node.id, service = %node.service, control_plane = ?bootstrap.control_plane, worker_threads = workers, "starting weft-proxy");
    let control_plane = Arc::new(ControlPlaneStatus::register(
        metrics.registry(),
        bootstrap.control_plane.clone(),
    )?);

    let admin_sock = listen::bind(bootstrap.admin).map_err(|source| StartError::AdminBind {
        addr: bootstrap.admin,
        source,
    })?;
    let status_limit = connection_limits.limit("status", crate::conn_limit::ADMIN_MAX_CONNECTIONS);
    let status_sock = bootstrap
        .status
        .map(|addr| {
            listen::bind(addr)
                .map(|sock| (addr, sock, status_limit))
                .map_err(|source| StartError::StatusBind { addr, source })
        })
        .transpose()?;
    let draining = Arc::new(AtomicBool::new(false));
    let admin_state = AdminState {
        limit: connection_limits.limit("admin", crate::conn_limit::ADMIN_MAX_CONNECTIONS),
        store: Arc::clone(&store),
        metrics: metrics.clone(),
        node: Arc::new(node.clone()),
        draining: Arc::clone(&draining),
        control_plane: Arc::clone(&control_plane),
    };
    let refresher = crate::egress::refresh::Refresher::new(
        Arc::clone(&store),
        Arc::clone(&listeners),
        metrics.clone(),
    );
    let apply_metrics = crate::discovery::ApplyMetrics::register(metrics.registry())?;
    let applier = ConfigApplier::new(Arc::clone(&store), Arc::clone(&listeners), metrics)
        .with_trust(Arc::clone(mesh_tls.trust()))
        .with_apply_metrics(apply_metrics);
    let mut discovery =
        Discovery::with_control_planes(bootstrap.control_plane.clone(), node.clone(), applier)
            .with_control_plane_ca(bootstrap.control_plane_ca.clone())
            .with_status(control_plane);
    if token.is_some() {
        discovery = discovery.wait_for_certificate(Arc::clone(mesh_tls.certs()));
    }
    let renewer = token.map(|token| {
        let (urls, ca) = (
            bootstrap.control_plane.clone(),
            bootstrap.control_plane_ca.clone(),
        );
        // Called for the first request and after every transport failure: each call takes the
        // next control-plane URL, so certificate requests fail over like the discovery stream
        // (a DNS name's addresses are tried in turn by the channel's connector).
        let next = std::sync::atomic::AtomicUsize::new(0);
        let connect: ChannelFactory = Box::new(move || {
            let i = next.fetch_add(1, Ordering::Relaxed) % urls.len().max(1);
            let url = urls.get(i).ok_or("no control_plane URL")?;
            control_endpoint_from_file(url, ca.as_deref())
                .map(|e| e.connect_lazy())
                .map_err(|e| e.to_string())
        });
        Renewer::new(
            Arc::clone(&mesh_tls),
            connect,
            CertifyParams {
                token,
                service: node.service.clone(),
                namespace: node.namespace.clone(),
                ttl: bootstrap.cert_ttl,
            },
        )
    });
    // Its blocking threads build snapshots (`discovery`): named so they count as the control
    // thread's work (benches/config_size.sh reads threads named `weft-control*`), and kept
    // between pushes however far apart rather than restarted after 10 s idle.
    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("weft-control-bg")
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .build()
        .map_err(|source| StartError::Runtime {
            which: "control",
            source,
        })?;
    // DNS endpoints resolve on the control runtime, off the data path (`crate::egress`); the
    // context is installed before the first snapshot is built.
    let egress = {
        let _in_control_runtime = control_rt.enter();
        let resolver = crate::egress::resolver::DnsResolver::from_config(&bootstrap.dns)?;
        crate::egress::EgressContext::new(Arc::new(resolver), dns_metrics)
    };
    crate::egress::install(Arc::clone(&egress));
    let admin_addr = bootstrap.admin;
    std::thread::Builder::new()
        .name("weft-control".into())
        .spawn(move || {
            control_rt.block_on(async move {
                match tokio::net::TcpListener::from_std(admin_sock) {
                    Ok(sock) => {
                        tracing::info!(addr = %admin_addr, "admin listening");
                        if let Some((addr, status_sock, limit)) = status_sock {
                            match tokio::net::TcpListener::from_std(status_sock) {
                                Ok(sock) => {
                                    tracing::info!(%addr, "status listening");
                                    let state = AdminState {
                                        limit,
                                        ..admin_state.clone()
                                    };
                                    tokio::spawn(admin::serve(sock, state, Surface::Status));
                                }
                                Err(e) => tracing::error!(error = %e, "status listener unusable"),
                            }
                        }
                        tokio::spawn(admin::serve(sock, admin_state, Surface::Admin));
                    }
                    Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                }
                if let Some(renewer) = renewer {
                    tokio::spawn(renewer.run());
                }
                tokio::spawn(refresher.run(egress));
                discovery.run().await;
            });
        })
        .map_err(StartError::Thread)?;

    data_rt.block_on(async {
        shutdown_signal().await;
        tracing::info!(drain_timeout = ?bootstrap.drain_timeout, "shutting down: draining listeners");
        draining.store(true, Ordering::Relaxed);
        let drained = listeners.lock().unwrap_or_else(PoisonError::into_inner).shutdown();
        // Connections enforce drain_timeout themselves; the margin covers their last writes.
        let limit = bootstrap.drain_timeout + Duration::from_millis(500);
        if tokio::time::timeout(limit, drained).await.is_err() {
            tracing::warn!("connections still open after the drain timeout; exiting anyway");
        }
        // The last requests' access log lines and spans, before the process goes.
        if !crate::observe::flush(FLUSH_AT_EXIT).await {
            tracing::warn!(limit = ?FLUSH_AT_EXIT, "access log / spans not flushed in time; exiting anyway");
        }
    });
    tracing::info!("drained; exiting");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the proxy");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
