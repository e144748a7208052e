//! Security metric families (ARCHITECTURE.md "Metrics"): handshakes, certificate expiry and
//! renewals, inbound connections by transport, and authorization denials. Registered into the
//! proxy's registry next to the request metrics.

use prometheus::{Gauge, IntCounter, IntCounterVec, Opts, Registry};

/// Handles for the security families.
#[derive(Clone, Debug)]
pub struct SecurityMetrics {
    handshakes: IntCounterVec,
    /// `weft_cert_expiry_timestamp_seconds`: notAfter of the certificate in force.
    pub cert_expiry: Gauge,
    /// `weft_cert_issued_timestamp_seconds`: when the certificate in force was received.
    pub cert_issued: Gauge,
    renewals: IntCounterVec,
    inbound_connections: IntCounterVec,
    authz_denied: IntCounterVec,
    origination_refused: IntCounterVec,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    made: prometheus::Result<C>,
) -> prometheus::Result<C> {
    let c = made?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl SecurityMetrics {
    /// Creates the families and registers them in `r`.
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            handshakes: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "weft_tls_handshakes_total",
                        "mTLS handshakes with peer sidecars; direction=inbound|outbound, result=ok|error",
                    ),
                    &["direction", "result"],
                ),
            )?,
            cert_expiry: reg(
                r,
                Gauge::new(
                    "weft_cert_expiry_timestamp_seconds",
                    "notAfter (Unix seconds) of this proxy's certificate in force; 0 = none yet",
                ),
            )?,
            cert_issued: reg(
                r,
                Gauge::new(
                    "weft_cert_issued_timestamp_seconds",
                    "When (Unix seconds) the certificate in force was received; renewal is due at 2/3 of issued..expiry",
                ),
            )?,
            renewals: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "weft_cert_renewals_total",
                        "Identity.Certify attempts; result=ok|error",
                    ),
                    &["result"],
                ),
            )?,
            inbound_connections: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "weft_inbound_connections_total",
                        "Connections accepted on inbound listeners; tls=mtls|plaintext, or refused (plaintext on a strict listener)",
                    ),
                    &["tls"],
                ),
            )?,
            authz_denied: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "weft_authz_denied_total",
                        "Requests (HTTP) and connections (TCP) denied by an authorization policy",
                    ),
                    &["direction", "policy", "protocol"],
                ),
            )?,
            origination_refused: {
                let c = reg(
                    r,
                    IntCounterVec::new(
                        Opts::new(
                            "weft_tls_origination_refused_total",
                            "Outbound connections to mesh endpoints refused instead of falling back to plaintext; reason=no_identity (this sidecar has no certificate) | invalid_identity (the endpoint's identity does not parse)",
                        ),
                        &["reason"],
                    ),
                )?;
                for reason in ["no_identity", "invalid_identity"] {
                    c.with_label_values(&[reason]);
                }
                c
            },
        })
    }

    /// Metrics in a throwaway registry (tests, tools).
    pub fn unregistered() -> Self {
        // A fresh registry holds no families, so registration cannot collide.
        #[allow(clippy::expect_used)]
        Self::register(&Registry::new()).expect("fresh registry")
    }

    /// `weft_tls_handshakes_total{direction,result}`.
    pub fn handshake(&self, direction: &str, ok: bool) -> IntCounter {
        self.handshakes
            .with_label_values(&[direction, if ok { "ok" } else { "error" }])
    }

    /// `weft_cert_renewals_total{result}`.
    pub fn renewal(&self, ok: bool) {
        self.renewals
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// `weft_inbound_connections_total{tls}`: `mtls`, `plaintext` or `refused`.
    pub fn inbound_connection(&self, tls: &str) {
        self.inbound_connections.with_label_values(&[tls]).inc();
    }

    /// `weft_authz_denied_total{direction,policy,protocol}` (through
    /// [`crate::metrics::Metrics::authz_denied`], which keeps the series while used).
    pub fn authz_denied(&self, direction: &str, policy: &str, protocol: &str) -> IntCounter {
        self.authz_denied
            .with_label_values(&[direction, policy, protocol])
    }

    /// `weft_tls_origination_refused_total{reason}`.
    pub fn origination_refused(&self) -> IntCounterVec {
        self.origination_refused.clone()
    }

    /// Removes `weft_authz_denied_total{direction,policy,protocol}`.
    pub fn remove_authz_denied(&self, direction: &str, policy: &str, protocol: &str) {
        let _ = self
            .authz_denied
            .remove_label_values(&[direction, policy, protocol]);
    }
}
