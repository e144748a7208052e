//! The data plane's shared state: what every accepted connection needs, whichever path serves
//! it (the listeners in [`crate::listen`], captured connections in [`crate::transparent`]).

use std::sync::Arc;
use std::time::Duration;

use crate::conn_limit::RefusalMetrics;
use crate::http::ServerBuilder;
use crate::snapshot::SnapshotStore;
use crate::tls::MeshTls;
use crate::transparent::shared::Transparent;

/// What accepted connections need, shared by every listener.
#[derive(Clone)]
pub struct DataPlane {
    /// The current snapshot.
    pub store: Arc<SnapshotStore>,
    /// How long removed listeners' connections may take to finish.
    pub drain_timeout: Duration,
    /// HTTP server settings.
    pub http: Arc<ServerBuilder>,
    /// Mesh mTLS (inbound termination).
    pub tls: Arc<MeshTls>,
    /// Per-listener connection caps: the counters, and the cap of each listener.
    pub limits: RefusalMetrics,
    /// Most connections one listener keeps open.
    pub max_connections: usize,
    /// Transparent mode: captured connections' lookup tables and detection metrics.
    pub transparent: Arc<Transparent>,
}
