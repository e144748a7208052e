//! Mesh DNS (transparent mode): the sidecar answers the app's DNS, which `weft-proxy init`
//! redirects to it (UDP and TCP port 53 -> [`crate::capture::DEFAULT_DNS_PORT`] on 127.0.0.1 /
//! ::1), so an app that knows nothing of the mesh resolves `api`, `api.<ns>`, `api.<ns>.svc`
//! and `api.<ns>.svc.<cluster domain>` to the service's VIP and its connection to the VIP is
//! captured like any other.
//!
//! ```text
//! query (UDP / TCP, server.rs: bounded size, connections, forwards)
//!   -> answer.rs: a standard query with one question?       no: FORMERR / NOTIMP (refused)
//!   -> names.rs: a mesh name of the snapshot in force?
//!        with a VIP: A / AAAA of it, NODATA for other types  (mesh)
//!        without:    NXDOMAIN                                (nxdomain)
//!   -> forward.rs: anything else to the upstream resolvers   (forwarded; failed: SERVFAIL, error)
//! ```
//!
//! The wire format is hickory-proto's; nothing here parses DNS bytes by hand. hickory-server
//! is not used: its request handler answers through a response builder, which cannot relay an
//! upstream's message as it came, and it does not bound forwards the way this server must.
//!
//! The server runs on its own thread (`weft-dns`) with a single-threaded runtime: app lookups
//! are never queued behind the data path or a control-plane push, and the data path never
//! waits for a slow upstream. It reads the snapshot; the snapshot knows nothing of it.

pub mod answer;
pub mod config;
pub mod forward;
pub mod metrics;
pub mod names;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use serde_json::{json, Value};

pub use config::MeshDnsConfig;

use crate::snapshot::{Snapshot, SnapshotStore};
use config::UpstreamSource;
use forward::Forwarder;
use metrics::DnsQueryMetrics;
use names::{MeshNames, NameCache};
use server::MeshDns;

/// Why the mesh DNS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listen address could not be bound.
    #[error("mesh DNS (transparent.dns): cannot bind {proto} {addr}: {source}")]
    Bind {
        /// `UDP` or `TCP`.
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The upstream resolvers could not be determined.
    #[error("mesh DNS (transparent.dns.upstreams): {0}")]
    Upstreams(String),
    /// The metric family could not be registered.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The thread or its runtime could not be started.
    #[error("mesh DNS: starting its thread: {0}")]
    Thread(std::io::Error),
}

/// What a running server is, for `/config_dump`.
#[derive(Debug)]
pub struct DnsInfo {
    /// The settings it runs with.
    pub config: MeshDnsConfig,
    /// Addresses served (UDP and TCP each).
    pub listening: Vec<SocketAddr>,
    /// Where other names go.
    pub upstreams: Vec<SocketAddr>,
    /// Where the upstreams came from.
    pub upstreams_from: UpstreamSource,
    /// The sidecar's namespace (bare names resolve in it first).
    pub namespace: String,
}

/// The server of this process, once started (`/config_dump`).
static INSTALLED: ArcSwapOption<DnsInfo> = ArcSwapOption::const_empty();

/// The sockets of the listen addresses (see [`bind`]).
#[derive(Debug)]
pub struct Bound {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    addrs: Vec<SocketAddr>,
}

/// Binds UDP and TCP on every address of `addrs`. The first (127.0.0.1) must bind; an IPv6
/// one that cannot (no IPv6 in the namespace) is skipped with a warning, but one whose port is
/// taken is an error like any other.
pub fn bind(addrs: &[SocketAddr]) -> Result<Bound, DnsError> {
    let mut bound = Bound {
        udp: Vec::new(),
        tcp: Vec::new(),
        addrs: Vec::new(),
    };
    for (i, addr) in addrs.iter().enumerate() {
        let udp = std::net::UdpSocket::bind(addr).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let pair = udp.map_err(|source| ("UDP", source)).and_then(|u| {
            crate::listen::bind(*addr)
                .map(|t| (u, t))
                .map_err(|source| ("TCP", source))
        });
        match pair {
            Ok((u, t)) => {
                bound.udp.push(u);
                bound.tcp.push(t);
                bound.addrs.push(*addr);
            }
            Err((_, source))
                if i > 0 && addr.is_ipv6() && source.kind() != std::io::ErrorKind::AddrInUse =>
            {
                tracing::warn!(%addr, error = %source, "mesh DNS: no IPv6 here; serving IPv4 only");
            }
            Err((proto, source)) => {
                return Err(DnsError::Bind {
                    proto,
                    addr: *addr,
                    source,
                })
            }
        }
    }
    Ok(bound)
}

/// Starts the server as `config` says for a sidecar in `namespace`, reading names from
/// `store`: binds (errors here stop the proxy: the capture rules send the namespace's DNS to
/// this port), then serves on its own thread for the life of the process.
pub fn start(
    config: &MeshDnsConfig,
    namespace: &str,
    store: Arc<SnapshotStore>,
    registry: &prometheus::Registry,
) -> Result<Arc<DnsInfo>, DnsError> {
    let (upstreams, upstreams_from) = config.resolve_upstreams().map_err(DnsError::Upstreams)?;
    let bound = bind(&config.listen_addrs())?;
    let metrics = DnsQueryMetrics::register(registry)?;
    let names = NameCache::new(store, config.domain(), namespace.to_owned());
    let dns = Arc::new(MeshDns::new(
        names,
        Forwarder::new(upstreams.clone(), config.timeout),
        metrics,
        config.max_concurrent_forwards,
    ));
    let info = Arc::new(DnsInfo {
        config: config.clone(),
        listening: bound.addrs.clone(),
        upstreams,
        upstreams_from,
        namespace: namespace.to_owned(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DnsError::Thread)?;
    tracing::info!(
        listening = ?info.listening,
        upstreams = ?info.upstreams,
        from = info.upstreams_from.as_str(),
        domain = %config.domain(),
        "mesh DNS serving"
    );
    std::thread::Builder::new()
        .name("weft-dns".into())
        .spawn(move || runtime.block_on(serve(bound, dns)))
        .map_err(DnsError::Thread)?;
    INSTALLED.store(Some(Arc::clone(&info)));
    Ok(info)
}

/// Serves `bound` with `dns` (on the current runtime) until the process ends.
pub async fn serve(bound: Bound, dns: Arc<MeshDns>) {
    let mut tasks = Vec::new();
    for s in bound.udp {
        match tokio::net::UdpSocket::from_std(s) {
            Ok(s) => tasks.push(tokio::spawn(server::serve_udp(s, Arc::clone(&dns)))),
            Err(e) => tracing::error!(error = %e, "mesh DNS: UDP socket unusable"),
        }
    }
    for l in bound.tcp {
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => tasks.push(tokio::spawn(server::serve_tcp(l, Arc::clone(&dns)))),
            Err(e) => tracing::error!(error = %e, "mesh DNS: TCP listener unusable"),
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The `dns` part of `/config_dump`: the server's settings and the names it answers from
/// `snapshot` (`{"enabled": false}` when no server runs).
pub fn config_dump(snapshot: Option<&Snapshot>) -> Value {
    let Some(info) = INSTALLED.load_full() else {
        return json!({"enabled": false});
    };
    let names = snapshot.map_or_else(Vec::new, |s| {
        MeshNames::build(s, &info.config.domain(), &info.namespace)
            .services()
            .iter()
            .map(|e| json!({"service": e.service, "vip": e.vip.map(|ip| ip.to_string()), "names": e.names}))
            .collect()
    });
    json!({
        "enabled": true,
        "listening": info.listening.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "cluster_domain": info.config.domain(),
        "namespace": info.namespace,
        "upstreams": info.upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "upstreams_from": info.upstreams_from.as_str(),
        "forward_timeout_ms": u64::try_from(info.config.timeout.as_millis()).unwrap_or(u64::MAX),
        "max_concurrent_forwards": info.config.max_concurrent_forwards,
        "max_query_bytes": server::MAX_QUERY_BYTES,
        "ttl_s": answer::MESH_TTL,
        "names": names,
    })
}
