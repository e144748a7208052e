//! The tunnel's metric families (kept out of `crate::metrics`):
//!
//! - `weft_tunnel_connections` (gauge): open pooled tunnel connections (`direction=outbound`:
//!   ours to peers; `inbound`: peers' to us);
//! - `weft_tunnel_streams_total{direction,result}`: CONNECT streams (TCP connections) carried:
//!   outbound `ok` (the peer answered 200), `refused` (another status: denied, over a limit,
//!   upstream unreachable), `error` (no stream: the tunnel connection failed or broke);
//!   inbound `ok` (admitted, its upstream connected), `denied` (authorization: 403),
//!   `refused` (rate or connection limit: 429 / 503, or not a CONNECT: 405), `error` (upstream
//!   unreachable: 502);
//! - `weft_tunnel_fallbacks_total`: connections dialled directly (one mTLS handshake each)
//!   because the peer does not speak the tunnel ALPN.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Result labels of `weft_tunnel_streams_total`.
pub const RESULTS: [&str; 4] = ["ok", "refused", "denied", "error"];

/// The handles, pre-resolved.
#[derive(Debug, Clone)]
pub struct TunnelMetrics {
    /// `weft_tunnel_connections{direction="outbound"}`.
    pub outbound_connections: IntGauge,
    /// `weft_tunnel_connections{direction="inbound"}`.
    pub inbound_connections: IntGauge,
    streams: IntCounterVec,
    /// `weft_tunnel_fallbacks_total`.
    pub fallbacks: IntCounter,
}

impl TunnelMetrics {
    /// Registers the families in `r`, every series at zero.
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let connections = IntGaugeVec::new(
            Opts::new(
                "weft_tunnel_connections",
                "Open pooled mTLS tunnel connections between sidecars; direction=outbound|inbound",
            ),
            &["direction"],
        )?;
        let streams = IntCounterVec::new(
            Opts::new(
                "weft_tunnel_streams_total",
                "TCP connections carried as CONNECT streams over tunnel connections; direction=outbound|inbound, result=ok|refused|denied|error",
            ),
            &["direction", "result"],
        )?;
        let fallbacks = IntCounter::new(
            "weft_tunnel_fallbacks_total",
            "TCP connections to mesh endpoints dialled with their own mTLS handshake because the peer does not speak the tunnel ALPN",
        )?;
        r.register(Box::new(connections.clone()))?;
        r.register(Box::new(streams.clone()))?;
        r.register(Box::new(fallbacks.clone()))?;
        for d in ["outbound", "inbound"] {
            for res in RESULTS {
                streams.with_label_values(&[d, res]);
            }
        }
        Ok(Self {
            outbound_connections: connections.with_label_values(&["outbound"]),
            inbound_connections: connections.with_label_values(&["inbound"]),
            streams,
            fallbacks,
        })
    }

    /// Metrics in a throwaway registry (tests).
    pub fn unregistered() -> Self {
        // A fresh registry holds no families, so registration cannot collide.
        #[allow(clippy::expect_used)]
        Self::register(&Registry::new()).expect("fresh registry")
    }

    /// Counts one stream of `direction` with `result` (one of [`RESULTS`]).
    pub fn stream(&self, direction: &str, result: &str) {
        self.streams.with_label_values(&[direction, result]).inc();
    }
}

static INSTALLED: std::sync::OnceLock<TunnelMetrics> = std::sync::OnceLock::new();

/// Makes `m` the process's tunnel metrics (first call wins; `app::run` at start).
pub fn install(m: TunnelMetrics) {
    let _ = INSTALLED.set(m);
}

/// The process's tunnel metrics (an unregistered copy before [`install`], in unit tests).
pub fn get() -> &'static TunnelMetrics {
    INSTALLED.get_or_init(TunnelMetrics::unregistered)
}
