//! Pooled mTLS tunnels between sidecars (ARCHITECTURE.md "Tunnel"): each TCP connection to a
//! mesh endpoint with an identity travels as one HTTP/2 CONNECT stream over a small pool of
//! long-lived mTLS connections to that endpoint (ALPN `weft-tunnel`), so a new TCP connection
//! costs a stream instead of a TLS handshake (Istio ztunnel's HBONE does the same).
//!
//! - [`pool`]: the connections per (endpoint address, expected identity): bounded count and
//!   streams, idle timeout, maximum age, retired when the trust bundle or our certificate
//!   changes; peers that do not speak the tunnel are remembered for a while (direct mTLS).
//! - [`client`]: opening a stream (the outbound side of `crate::tcp`).
//! - [`server`]: the inbound side: an h2 server taking only CONNECT; each stream goes through
//!   `crate::tcp::proxy_to` exactly like one inbound mTLS TCP connection.
//! - [`metrics`]: `weft_tunnel_connections`, `weft_tunnel_streams_total`,
//!   `weft_tunnel_fallbacks_total`.
//!
//! The switch is process-wide: [`install`] at start (`app::run`) when the bootstrap's
//! `tunnel.enabled` is true and this proxy has a mesh identity; without it every TCP connection
//! to a mesh endpoint does its own mTLS handshake, as before.

pub mod client;
pub mod metrics;
pub mod pool;
pub mod server;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use crate::tls::MeshTls;

/// HTTP/2 settings of tunnel connections (both ends): at most this many streams (TCP
/// connections) at once per connection ...
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// ... each stream may have this much unacknowledged data in flight ...
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// ... and all of a connection's streams together this much: one bulk flow fills its stream
/// window, a sixteenth of the connection's, and the others keep the rest.
pub const CONNECTION_WINDOW: u32 = 16 * STREAM_WINDOW;
/// Largest DATA frame either end accepts (HTTP/2's default is 16 KiB): fewer frames per MB.
pub const MAX_FRAME: u32 = 64 * 1024;

/// `tunnel:` of the bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Carry TCP connections to mesh endpoints over pooled tunnel connections, and accept
    /// them inbound. Default true; `WEFT_TUNNEL=off` overrides it.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Most tunnel connections per (endpoint, identity).
    #[serde(default = "default_max_connections")]
    pub max_connections_per_peer: usize,
    /// A tunnel connection with no stream for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A tunnel connection older than this takes no new streams (closed once its streams end).
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// How long a peer that refused the tunnel ALPN is dialled directly before trying again.
    #[serde(default = "default_fallback_for", with = "humantime_serde")]
    pub fallback_for: Duration,
}

fn default_enabled() -> bool {
    true
}

fn default_max_connections() -> usize {
    4
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_age() -> Duration {
    Duration::from_secs(600)
}

fn default_fallback_for() -> Duration {
    Duration::from_secs(300)
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            max_connections_per_peer: default_max_connections(),
            idle_timeout: default_idle_timeout(),
            max_age: default_max_age(),
            fallback_for: default_fallback_for(),
        }
    }
}

/// The env var that switches the tunnel off (`off`, `false`, `0`) or on (`on`, `true`, `1`)
/// whatever the bootstrap says.
pub const ENV: &str = "WEFT_TUNNEL";

impl TunnelConfig {
    /// Applies [`ENV`]'s value; an unknown value is an error naming it.
    pub fn apply_env(&mut self, value: Option<&str>) -> Result<(), String> {
        match value.map(str::trim) {
            None | Some("") => Ok(()),
            Some("off" | "false" | "0") => {
                self.enabled = false;
                Ok(())
            }
            Some("on" | "true" | "1") => {
                self.enabled = true;
                Ok(())
            }
            Some(other) => Err(format!("{ENV}={other:?}: expected on|off|true|false|1|0")),
        }
    }

    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections_per_peer == 0 {
            return Err("tunnel.max_connections_per_peer: must be at least 1".into());
        }
        for (field, d) in [
            ("idle_timeout", self.idle_timeout),
            ("max_age", self.max_age),
        ] {
            if d.is_zero() {
                return Err(format!("tunnel.{field}: must be more than 0"));
            }
        }
        Ok(())
    }
}

/// The process's tunnel: the pool of outbound tunnel connections.
#[derive(Debug)]
pub struct Tunnel {
    pool: Arc<pool::Pool>,
}

impl Tunnel {
    /// The pool.
    pub fn pool(&self) -> &Arc<pool::Pool> {
        &self.pool
    }
}

static TUNNEL: OnceLock<Tunnel> = OnceLock::new();

/// Turns the outbound tunnel on for this process (first call wins): TCP connections to mesh
/// endpoints with an identity go over pooled connections made with `tls`.
pub fn install(tls: Arc<MeshTls>, config: &TunnelConfig, metrics: metrics::TunnelMetrics) {
    let pool = pool::Pool::new(tls, pool::Settings::from(config), metrics);
    let _ = TUNNEL.set(Tunnel { pool });
}

/// The outbound tunnel, if it is on.
pub fn active() -> Option<&'static Tunnel> {
    TUNNEL.get()
}

/// `/config_dump`'s `tunnel`: `{"enabled": false}` when the outbound tunnel is off, else
/// `{"enabled": true, "peers": [..], "direct": [..]}` ([`pool::Pool::dump`]).
pub fn dump() -> serde_json::Value {
    match active() {
        None => serde_json::json!({ "enabled": false }),
        Some(t) => {
            let mut d = t.pool.dump(std::time::Instant::now());
            d["enabled"] = serde_json::Value::Bool(true);
            d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_env_override_and_bad_values() {
        let c: TunnelConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, TunnelConfig::default());
        assert!(c.enabled);
        let mut off: TunnelConfig =
            serde_yaml::from_str("enabled: false\nidle_timeout: 5s").unwrap();
        assert!(!off.enabled);
        assert_eq!(off.idle_timeout, Duration::from_secs(5));
        off.apply_env(Some("on")).unwrap();
        assert!(off.enabled);
        off.apply_env(Some("off")).unwrap();
        assert!(!off.enabled);
        off.apply_env(None).unwrap();
        assert!(!off.enabled);
        let e = off.apply_env(Some("maybe")).unwrap_err();
        assert!(e.contains("WEFT_TUNNEL") && e.contains("maybe"), "{e}");
        assert!(serde_yaml::from_str::<TunnelConfig>("enable: true").is_err());
        let zero: TunnelConfig = serde_yaml::from_str("max_connections_per_peer: 0").unwrap();
        assert!(zero
            .validate()
            .unwrap_err()
            .contains("tunnel.max_connections_per_peer"));
        let idle: TunnelConfig = serde_yaml::from_str("idle_timeout: 0s").unwrap();
        assert!(idle.validate().unwrap_err().contains("tunnel.idle_timeout"));
    }
}
