//! The control plane's Prometheus metrics (names are API: see ARCHITECTURE.md), in their own
//! registry so tests and embedders never collide with a global one.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Errors creating or rendering metrics.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every control-plane metric.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub proxies_connected: IntGauge,
    /// Labels: `type` (listeners|routes|clusters|endpoints), `result` (ack|nack|timeout).
    pub pushes_total: IntCounterVec,
    /// Convergence: from the change a push carries (policy apply/reload, registry change, or
    /// the proxy's connect) to the proxy's ACK of that push. One observation per ACKed push.
    pub push_duration_seconds: Histogram,
    /// Connected proxies whose latest answer was a NACK.
    pub proxies_nacking: IntGauge,
    policy_version_info: IntGaugeVec,
    /// Label `result` (ok|error).
    pub policy_reloads_total: IntCounterVec,
    /// 1 while the store holds an invalid file.
    pub policy_errors: IntGauge,
    /// When the CA's issuing certificate expires (unix seconds; 0 without a CA).
    pub issuer_expiry_timestamp_seconds: IntGauge,
    /// `Identity.Certify` answers, label `result` (see [`CERTIFY_RESULTS`]).
    pub certificates_issued_total: IntCounterVec,
    /// Discovery streams refused at registration, label `reason`
    /// ([`crate::admission::REFUSAL_REASONS`]).
    pub registrations_refused_total: IntCounterVec,
    /// Connections closed at accept because a server's connection cap was reached, label
    /// `server` (`grpc`, `admin`).
    pub connections_refused_total: IntCounterVec,
    /// Admin API requests refused, label `reason` (`unauthenticated`, `forbidden`).
    pub admin_requests_denied_total: IntCounterVec,
    /// Scope lookups of discovery streams, label `result` (`compiled`, `reused`, `patched`).
    pub compilations_total: IntCounterVec,
    /// Discovery streams with a change they have not pushed yet.
    pub pushes_pending: IntGauge,
}

/// The `result` label values of `weft_control_certificates_issued_total`.
pub const CERTIFY_RESULTS: [&str; 5] = ["ok", "unauthenticated", "invalid", "refused", "error"];

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let proxies_connected = IntGauge::new(
            "weft_control_proxies_connected",
            "Proxies with an open discovery stream.",
        )?;
        let pushes_total = IntCounterVec::new(
            Opts::new(
                "weft_control_pushes_total",
                "Resource sets pushed to proxies, by type and the proxy's answer (ack, nack, or timeout: unanswered within --push-timeout).",
            ),
            &["type", "result"],
        )?;
        let push_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "weft_control_push_duration_seconds",
                "Convergence: time from a config change (policy apply/reload, registry change, proxy connect) to the proxy's ACK of the push carrying it.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0,
            ]),
        )?;
        let proxies_nacking = IntGauge::new(
            "weft_control_proxies_nacking",
            "Connected proxies whose latest answer was a NACK (they run older config than they were sent).",
        )?;
        let policy_version_info = IntGaugeVec::new(
            Opts::new(
                "weft_control_policy_version_info",
                "The version of the policy set being served (value 1).",
            ),
            &["version"],
        )?;
        let policy_reloads_total = IntCounterVec::new(
            Opts::new(
                "weft_control_policy_reloads_total",
                "Policy set loads (watcher reloads and admin writes), by result.",
            ),
            &["result"],
        )?;
        let policy_errors = IntGauge::new(
            "weft_control_policy_errors",
            "1 while the policy store holds an invalid file, else 0.",
        )?;
        let issuer_expiry_timestamp_seconds = IntGauge::new(
            "weft_control_issuer_expiry_timestamp_seconds",
            "When the CA certificate that signs proxy certificates expires (unix seconds; 0 without a CA).",
        )?;
        let certificates_issued_total = IntCounterVec::new(
            Opts::new(
                "weft_control_certificates_issued_total",
                "Identity.Certify requests by result: ok, unauthenticated (bad join token), invalid (bad CSR or name), refused (CA issuer expired or expiring first), error.",
            ),
            &["result"],
        )?;
        let registrations_refused_total = IntCounterVec::new(
            Opts::new(
                "weft_control_registrations_refused_total",
                "Discovery streams refused before registering, by reason: unauthenticated (no or bad client certificate), identity_mismatch (Hello claims another service than the certificate), id_taken (node id held by another identity), invalid (malformed or oversized node), too_many (registry caps), hello_timeout.",
            ),
            &["reason"],
        )?;
        let connections_refused_total = IntCounterVec::new(
            Opts::new(
                "weft_control_connections_refused_total",
                "Connections closed at accept because the server's connection cap was reached, by server (grpc, admin).",
            ),
            &["server"],
        )?;
        let admin_requests_denied_total = IntCounterVec::new(
            Opts::new(
                "weft_control_admin_requests_denied_total",
                "Admin API requests refused: unauthenticated (no or unknown credential, 401) or forbidden (a read-only credential on a mutating call, 403).",
            ),
            &["reason"],
        )?;
        let compilations_total = IntCounterVec::new(
            Opts::new(
                "weft_control_compilations_total",
                "Scope lookups by discovery streams: compiled (the scope's policy, trust or the registrations it holds changed), patched (only endpoints changed: those clusters' endpoints recomputed) or reused (shared with the other proxies of the scope).",
            ),
            &["result"],
        )?;
        let pushes_pending = IntGauge::new(
            "weft_control_pushes_pending",
            "Discovery streams that saw a change and have not pushed it yet (the push queue).",
        )?;
        registry.register(Box::new(compilations_total.clone()))?;
        registry.register(Box::new(pushes_pending.clone()))?;
        for result in ["compiled", "reused", "patched"] {
            compilations_total.with_label_values(&[result]);
        }
        registry.register(Box::new(registrations_refused_total.clone()))?;
        registry.register(Box::new(connections_refused_total.clone()))?;
        registry.register(Box::new(admin_requests_denied_total.clone()))?;
        for reason in crate::admission::REFUSAL_REASONS {
            registrations_refused_total.with_label_values(&[reason]);
        }
        for server in ["grpc", "admin"] {
            connections_refused_total.with_label_values(&[server]);
        }
        for reason in ["unauthenticated", "forbidden"] {
            admin_requests_denied_total.with_label_values(&[reason]);
        }
        registry.register(Box::new(issuer_expiry_timestamp_seconds.clone()))?;
        registry.register(Box::new(certificates_issued_total.clone()))?;
        for result in CERTIFY_RESULTS {
            certificates_issued_total.with_label_values(&[result]);
        }
        registry.register(Box::new(proxies_connected.clone()))?;
        registry.register(Box::new(pushes_total.clone()))?;
        registry.register(Box::new(push_duration_seconds.clone()))?;
        registry.register(Box::new(proxies_nacking.clone()))?;
        registry.register(Box::new(policy_version_info.clone()))?;
        registry.register(Box::new(policy_reloads_total.clone()))?;
        registry.register(Box::new(policy_errors.clone()))?;
        // Show both results from the start so rate() works before the first event.
        for result in ["ok", "error"] {
            policy_reloads_total.with_label_values(&[result]);
        }
        for t in ["listeners", "routes", "clusters", "endpoints"] {
            for result in ["ack", "nack", "timeout"] {
                pushes_total.with_label_values(&[t, result]);
            }
        }
        Ok(Self {
            registry,
            proxies_connected,
            pushes_total,
            push_duration_seconds,
            proxies_nacking,
            policy_version_info,
            policy_reloads_total,
            policy_errors,
            issuer_expiry_timestamp_seconds,
            certificates_issued_total,
            registrations_refused_total,
            connections_refused_total,
            admin_requests_denied_total,
            compilations_total,
            pushes_pending,
        })
    }

    /// Makes `version` the only `weft_control_policy_version_info` series.
    pub fn set_policy_version(&self, version: &str) {
        self.policy_version_info.reset();
        self.policy_version_info
            .with_label_values(&[version])
            .set(1);
    }

    /// Registers a collector owned by another module (e.g. the injection webhook's), so
    /// `/metrics` exposes it without this file knowing it.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_names() {
        let m = Metrics::new().unwrap();
        m.set_policy_version("abc");
        m.set_policy_version("def");
        m.pushes_total.with_label_values(&["routes", "ack"]).inc();
        m.push_duration_seconds.observe(0.01);
        let text = m.render().unwrap();
        for name in [
            "weft_control_proxies_connected 0",
            "weft_control_pushes_total{result=\"ack\",type=\"routes\"} 1",
            "weft_control_push_duration_seconds_bucket",
            "weft_control_policy_version_info{version=\"def\"} 1",
            "weft_control_policy_reloads_total{result=\"ok\"} 0",
            "weft_control_policy_errors 0",
            "weft_control_proxies_nacking 0",
            "weft_control_pushes_total{result=\"timeout\",type=\"endpoints\"} 0",
            "weft_control_issuer_expiry_timestamp_seconds 0",
            "weft_control_certificates_issued_total{result=\"refused\"} 0",
            "weft_control_registrations_refused_total{reason=\"id_taken\"} 0",
            "weft_control_connections_refused_total{server=\"grpc\"} 0",
            "weft_control_admin_requests_denied_total{reason=\"forbidden\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(!text.contains("version=\"abc\""));
    }
}
