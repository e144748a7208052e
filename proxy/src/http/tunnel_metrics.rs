//! Metric families of HTTP tunnels ([`super::upgrade`], [`super::connect`]) and of the egress
//! policy, kept out of `crate::metrics` (which owns the request and TCP families):
//!
//! - `weft_tunnels_total{direction,kind}`: tunnels established (the upstream agreed: 101, or
//!   200 to a CONNECT);
//! - `weft_tunnels_open{direction,kind}` (gauge): tunnels currently spliced;
//! - `weft_tunnel_bytes_total{direction,kind,flow=rx|tx}`: bytes read from (`rx`) and written
//!   to (`tx`) the downstream while spliced, counted as they pass, like `weft_tcp_bytes_total`;
//! - `weft_egress_denied_total{via}`: destinations refused by the outbound listener's egress
//!   policy (`via="connect"`: a CONNECT request, answered 403 `egress-denied`;
//!   `via="passthrough"`: a captured connection to an unknown destination, closed; transparent
//!   mode, `crate::transparent`).
//!
//! `kind` is `websocket` (HTTP/1.1 `Upgrade: websocket` or RFC 8441 extended CONNECT with
//! `:protocol websocket`), `upgrade` (any other HTTP/1.1 upgrade protocol) or `connect`
//! (CONNECT host:port). Every label value comes from these fixed sets, so the families have at
//! most 6 series each (12 for bytes, 2 for egress denials), all created at registration: a scrape shows zeros before
//! the first tunnel and each tunnel resolves its handles by index, without a lookup.
//!
//! The families are process-wide, like the access log: [`register`] installs them in the
//! proxy's registry at start-up (`app::run`); before that (unit tests) the data path counts into
//! an unregistered copy.

use std::sync::OnceLock;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::metrics::MetricsError;
use crate::snapshot::Direction;

/// What a tunnel carries (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    /// WebSocket: HTTP/1.1 `Upgrade: websocket` or extended CONNECT `:protocol websocket`.
    WebSocket,
    /// Another HTTP/1.1 upgrade protocol.
    Upgrade,
    /// CONNECT host:port (an egress tunnel to a TCP destination).
    Connect,
}

impl TunnelKind {
    const ALL: [Self; 3] = [Self::WebSocket, Self::Upgrade, Self::Connect];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Upgrade => "upgrade",
            Self::Connect => "connect",
        }
    }
}

/// The handles of one (direction, kind).
#[derive(Debug, Clone)]
pub struct TunnelHandles {
    /// `weft_tunnels_total`.
    pub opened: IntCounter,
    /// `weft_tunnels_open`.
    pub open: IntGauge,
    /// `weft_tunnel_bytes_total{flow="rx"}`: read from the downstream.
    pub rx: IntCounter,
    /// `weft_tunnel_bytes_total{flow="tx"}`: written to the downstream.
    pub tx: IntCounter,
}

impl TunnelHandles {
    /// Counts a tunnel established; it is open until the guard drops.
    pub fn open(&self) -> OpenTunnel<'_> {
        self.opened.inc();
        self.open.inc();
        OpenTunnel(&self.open)
    }
}

/// A tunnel counted in `weft_tunnels_open` (see [`TunnelHandles::open`]).
#[derive(Debug)]
pub struct OpenTunnel<'a>(&'a IntGauge);

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every family of this module, with the handles of each label combination.
#[derive(Debug)]
pub struct TunnelMetrics {
    /// Indexed by [`direction_index`], then kind.
    handles: [[TunnelHandles; 3]; 2],
    /// `weft_egress_denied_total{via="connect"}`.
    egress_denied_connect: IntCounter,
    /// `weft_egress_denied_total{via="passthrough"}`.
    egress_denied_passthrough: IntCounter,
}

fn direction_index(d: Direction) -> usize {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

fn kind_index(k: TunnelKind) -> usize {
    match k {
        TunnelKind::WebSocket => 0,
        TunnelKind::Upgrade => 1,
        TunnelKind::Connect => 2,
    }
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    name: &'static str,
    made: Result<C, prometheus::Error>,
) -> Result<C, MetricsError> {
    let c = made.map_err(|source| MetricsError::Register { name, source })?;
    r.register(Box::new(c.clone()))
        .map_err(|source| MetricsError::Register { name, source })?;
    Ok(c)
}

impl TunnelMetrics {
    /// Creates the families and registers them in `r`.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        let opened = reg(
            r,
            "weft_tunnels_total",
            IntCounterVec::new(
                Opts::new(
                    "weft_tunnels_total",
                    "Tunnels established (HTTP/1.1 upgrades, extended CONNECT, CONNECT), by \
                     direction and kind=websocket|upgrade|connect",
                ),
                &["direction", "kind"],
            ),
        )?;
        let open = reg(
            r,
            "weft_tunnels_open",
            IntGaugeVec::new(
                Opts::new("weft_tunnels_open", "Tunnels currently open"),
                &["direction", "kind"],
            ),
        )?;
        let bytes = reg(
            r,
            "weft_tunnel_bytes_total",
            IntCounterVec::new(
                Opts::new(
                    "weft_tunnel_bytes_total",
                    "Bytes carried by tunnels: flow=rx read from the downstream, tx written to it",
                ),
                &["direction", "kind", "flow"],
            ),
        )?;
        let denied = reg(
            r,
            "weft_egress_denied_total",
            IntCounterVec::new(
                Opts::new(
                    "weft_egress_denied_total",
                    "Destinations refused by the egress policy (unknown: deny), by how they \
                     were asked for (via=connect|passthrough)",
                ),
                &["via"],
            ),
        )?;
        let handles = [Direction::Outbound, Direction::Inbound].map(|d| {
            TunnelKind::ALL.map(|k| {
                let l = [d.as_str(), k.as_str()];
                TunnelHandles {
                    opened: opened.with_label_values(&l),
                    open: open.with_label_values(&l),
                    rx: bytes.with_label_values(&[l[0], l[1], "rx"]),
                    tx: bytes.with_label_values(&[l[0], l[1], "tx"]),
                }
            })
        });
        Ok(Self {
            handles,
            egress_denied_connect: denied.with_label_values(&["connect"]),
            egress_denied_passthrough: denied.with_label_values(&["passthrough"]),
        })
    }

    /// The handles of tunnels of `kind` on listeners of `direction`.
    pub fn handles(&self, direction: Direction, kind: TunnelKind) -> &TunnelHandles {
        &self.handles[direction_index(direction)][kind_index(kind)]
    }

    /// `weft_egress_denied_total{via="connect"}`.
    pub fn egress_denied_connect(&self) -> &IntCounter {
        &self.egress_denied_connect
    }

    /// `weft_egress_denied_total{via="passthrough"}`.
    pub fn egress_denied_passthrough(&self) -> &IntCounter {
        &self.egress_denied_passthrough
    }
}

static INSTALLED: OnceLock<TunnelMetrics> = OnceLock::new();

/// Registers the families in `r` (the proxy's registry) and makes them the ones the data path
/// counts into. Call once, before any listener serves; a second call registers nothing new and
/// keeps the installed families.
pub fn register(r: &Registry) -> Result<(), MetricsError> {
    let metrics = TunnelMetrics::new(r)?;
    // Err: installed already (a second call, or a unit test counted before): keep those.
    let _ = INSTALLED.set(metrics);
    Ok(())
}

/// The installed families (an unregistered copy if [`register`] was never called).
pub fn get() -> &'static TunnelMetrics {
    INSTALLED.get_or_init(|| {
        // A fresh registry holds no families, so registration cannot collide.
        #[allow(clippy::expect_used)]
        TunnelMetrics::new(&Registry::new()).expect("fresh registry")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_from_the_start() {
        let r = Registry::new();
        let m = TunnelMetrics::new(&r).unwrap();
        let families = r.gather();
        let count = |name: &str| {
            families
                .iter()
                .find(|f| f.name() == name)
                .map_or(0, |f| f.get_metric().len())
        };
        assert_eq!(count("weft_tunnels_total"), 6);
        assert_eq!(count("weft_tunnels_open"), 6);
        assert_eq!(count("weft_tunnel_bytes_total"), 12);
        assert_eq!(count("weft_egress_denied_total"), 2);

        let h = m.handles(Direction::Inbound, TunnelKind::WebSocket);
        {
            let _open = h.open();
            assert_eq!(h.open.get(), 1);
        }
        assert_eq!(h.open.get(), 0);
        assert_eq!(h.opened.get(), 1);
        assert_eq!(
            m.handles(Direction::Outbound, TunnelKind::WebSocket)
                .opened
                .get(),
            0
        );
    }
}
