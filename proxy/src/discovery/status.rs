//! Which control-plane replica the proxy is on, and how often it had to reconnect: the
//! `weft_control_plane_connected{address}` gauge, the
//! `weft_control_plane_reconnects_total{reason}` counter, and the same facts in `/config_dump`
//! (`control_plane`).
//!
//! The gauge has one series at a time: the address of the current (or last) stream, 1 while
//! that stream is open, 0 while the proxy is looking for a replica; moving to another address
//! removes the old series, so replicas coming and going do not grow the scrape.

use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::{json, Value};

use super::targets::Target;
use crate::metrics::MetricsError;

/// Why the client connects again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No address, or no connection to it (refused, timed out, TLS handshake failed).
    Unreachable,
    /// The stream failed: the replica went away, or ended it with an error (refused the
    /// registration, the certificate expired).
    StreamError,
    /// The replica ended the stream cleanly (it is shutting down).
    StreamClosed,
    /// The control-plane TLS settings are unusable (`control_plane_ca` unreadable).
    ConfigError,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 4] = [
        Reason::Unreachable,
        Reason::StreamError,
        Reason::StreamClosed,
        Reason::ConfigError,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unreachable => "unreachable",
            Reason::StreamError => "stream_error",
            Reason::StreamClosed => "stream_closed",
            Reason::ConfigError => "config_error",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The target of the current or last stream.
    current: Option<Target>,
    /// Its stream is open.
    connected: bool,
    /// When it opened (Unix ms).
    since_unix_ms: u64,
    /// Streams opened so far.
    streams: u64,
    /// Why the last attempt or stream ended, with its error.
    last_error: Option<String>,
}

/// The control-plane connection's state and metrics.
#[derive(Debug)]
pub struct ControlPlaneStatus {
    urls: Vec<String>,
    connected: IntGaugeVec,
    reconnects: IntCounterVec,
    state: Mutex<State>,
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ControlPlaneStatus {
    /// The status of a client of `urls`, its families registered in `r`.
    pub fn register(r: &Registry, urls: Vec<String>) -> Result<Self, MetricsError> {
        let s = Self::unregistered(urls);
        r.register(Box::new(s.connected.clone()))
            .map_err(|source| MetricsError::Register {
                name: "weft_control_plane_connected",
                source,
            })?;
        r.register(Box::new(s.reconnects.clone()))
            .map_err(|source| MetricsError::Register {
                name: "weft_control_plane_reconnects_total",
                source,
            })?;
        Ok(s)
    }

    /// The same, registered nowhere (tests, embedders without a registry).
    pub fn unregistered(urls: Vec<String>) -> Self {
        // Names and labels are constants: building the families cannot fail.
        let connected = IntGaugeVec::new(
            Opts::new(
                "weft_control_plane_connected",
                "1 while the discovery stream to this control-plane address is open, 0 while \
                 looking for a replica (one series: the current or last address)",
            ),
            &["address"],
        )
        .unwrap_or_else(|e| unreachable!("constant metric definition: {e}"));
        let reconnects = IntCounterVec::new(
            Opts::new(
                "weft_control_plane_reconnects_total",
                "Discovery connection attempts that failed and streams that ended, by reason; \
                 each is followed by an attempt on the next control-plane address",
            ),
            &["reason"],
        )
        .unwrap_or_else(|e| unreachable!("constant metric definition: {e}"));
        for r in Reason::ALL {
            reconnects.with_label_values(&[r.as_str()]);
        }
        Self {
            urls,
            connected,
            reconnects,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A stream to `target` is open.
    pub fn opened(&self, target: &Target) {
        let mut s = self.state();
        if let Some(old) = s.current.as_ref().filter(|old| old.addr != target.addr) {
            let _ = self.connected.remove_label_values(&[&old.addr.to_string()]);
        }
        self.connected
            .with_label_values(&[&target.addr.to_string()])
            .set(1);
        s.current = Some(target.clone());
        s.connected = true;
        s.since_unix_ms = unix_ms_now();
        s.streams += 1;
    }

    /// The attempt or stream ended for `reason` (`error` says how): the client connects again.
    pub fn ended(&self, reason: Reason, error: Option<String>) {
        let mut s = self.state();
        if let Some(current) = &s.current {
            self.connected
                .with_label_values(&[&current.addr.to_string()])
                .set(0);
        }
        s.connected = false;
        s.last_error = error;
        self.reconnects.with_label_values(&[reason.as_str()]).inc();
    }

    /// Whether a stream is open.
    pub fn is_connected(&self) -> bool {
        self.state().connected
    }

    /// The `/config_dump` `control_plane` object.
    pub fn to_json(&self) -> Value {
        let s = self.state();
        let reconnects: serde_json::Map<String, Value> = Reason::ALL
            .iter()
            .map(|r| {
                (
                    r.as_str().to_owned(),
                    json!(self.reconnects.with_label_values(&[r.as_str()]).get()),
                )
            })
            .collect();
        json!({
            "urls": self.urls,
            "url": s.current.as_ref().map(|t| t.url.clone()),
            "address": s.current.as_ref().map(|t| t.addr.to_string()),
            "connected": s.connected,
            "connected_since_unix_ms": if s.connected { Some(s.since_unix_ms) } else { None },
            "streams": s.streams,
            "reconnects": reconnects,
            "last_error": s.last_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(addr: &str) -> Target {
        Target {
            url: format!("https://{addr}"),
            addr: addr.parse().unwrap(),
        }
    }

    /// The exposition lines of family `name`, without HELP/TYPE.
    fn lines(r: &Registry, name: &str) -> Vec<String> {
        use prometheus::Encoder as _;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .map(str::to_owned)
            .collect()
    }

    fn gauge_lines(r: &Registry) -> Vec<String> {
        lines(r, "weft_control_plane_connected")
    }

    #[test]
    fn one_gauge_series_follows_the_current_replica() {
        let r = Registry::new();
        let s =
            ControlPlaneStatus::register(&r, vec!["https://a".into(), "https://b".into()]).unwrap();
        assert!(gauge_lines(&r).is_empty());
        s.opened(&target("10.0.0.1:15010"));
        assert_eq!(
            gauge_lines(&r),
            ["weft_control_plane_connected{address=\"10.0.0.1:15010\"} 1"]
        );
        assert!(s.is_connected());
        s.ended(Reason::StreamError, Some("reset".into()));
        assert_eq!(
            gauge_lines(&r),
            ["weft_control_plane_connected{address=\"10.0.0.1:15010\"} 0"]
        );
        s.ended(Reason::Unreachable, Some("refused".into()));
        s.opened(&target("10.0.0.2:15010"));
        assert_eq!(
            gauge_lines(&r),
            ["weft_control_plane_connected{address=\"10.0.0.2:15010\"} 1"]
        );
        let d = s.to_json();
        assert_eq!(d["address"], "10.0.0.2:15010");
        assert_eq!(d["url"], "https://10.0.0.2:15010");
        assert_eq!(d["connected"], true);
        assert_eq!(d["streams"], 2);
        assert_eq!(d["reconnects"]["stream_error"], 1);
        assert_eq!(d["reconnects"]["unreachable"], 1);
        assert_eq!(d["reconnects"]["stream_closed"], 0);
        assert_eq!(d["urls"], json!(["https://a", "https://b"]));
        assert_eq!(d["last_error"], "refused");
    }

    #[test]
    fn every_reason_is_exported_from_the_start() {
        let r = Registry::new();
        let _s = ControlPlaneStatus::register(&r, vec![]).unwrap();
        assert_eq!(
            lines(&r, "weft_control_plane_reconnects_total"),
            [
                "weft_control_plane_reconnects_total{reason=\"config_error\"} 0",
                "weft_control_plane_reconnects_total{reason=\"stream_closed\"} 0",
                "weft_control_plane_reconnects_total{reason=\"stream_error\"} 0",
                "weft_control_plane_reconnects_total{reason=\"unreachable\"} 0",
            ]
        );
    }
}
