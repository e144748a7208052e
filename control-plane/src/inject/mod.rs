//! The sidecar injection webhook (`--inject-addr`): Kubernetes' API server posts an
//! `admission.k8s.io/v1` AdmissionReview for every pod created in a namespace labelled
//! `weft.io/inject=enabled`, and gets back a JSON Patch adding the proxy.
//!
//! - [`pod`]: the pure function, Pod -> JSON Patch (or skip / refuse), typed with k8s-openapi;
//! - [`probes`]: the app's kubelet probes rewritten to go through the proxy;
//! - [`config`]: `--inject-config` (image, resources, control-plane address, identity, capture);
//! - [`review`]: AdmissionReview in, AdmissionReview out (uid echoed, base64 patch), and the
//!   failure policy of the webhook's own errors;
//! - [`server`]: the HTTPS server around it (rustls, certificate re-read on change,
//!   `POST /inject`, `GET /healthz`).
//!
//! Nothing else in the control plane imports this module; the binary starts it.

pub mod config;
pub mod pod;
pub mod probes;
pub mod review;
pub mod server;
#[cfg(test)]
mod tests;

use prometheus::IntCounterVec;

/// Pod annotation: `"false"` opts a pod out (`"true"` matters to the chart's objectSelector).
pub const ANNOTATION_INJECT: &str = "weft.io/inject";
/// Marker of an injected pod; its value is the weft version that injected it.
pub const ANNOTATION_INJECTED: &str = "weft.io/injected";
pub const ANNOTATION_CPU_REQUEST: &str = "weft.io/proxy-cpu-request";
pub const ANNOTATION_CPU_LIMIT: &str = "weft.io/proxy-cpu-limit";
pub const ANNOTATION_MEMORY_REQUEST: &str = "weft.io/proxy-memory-request";
pub const ANNOTATION_MEMORY_LIMIT: &str = "weft.io/proxy-memory-limit";
pub const ANNOTATION_LOG_LEVEL: &str = "weft.io/log-level";
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "weft.io/exclude-inbound-ports";
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "weft.io/exclude-outbound-ports";
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "weft.io/exclude-outbound-cidrs";

/// The native sidecar's container name.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// The capture init container's name.
pub const INIT_CONTAINER: &str = "weft-init";
/// The projected ServiceAccount token volume.
pub const TOKEN_VOLUME: &str = "weft-token";
/// The proxy's writable memory volume (the CA file; the capture tools' lock in `weft-init`).
pub const RUN_VOLUME: &str = "weft-run";
pub const TOKEN_DIR: &str = "/var/run/secrets/weft.io/token";
pub const TOKEN_FILE: &str = "token";
pub const RUN_DIR: &str = "/var/run/weft";
pub const CA_FILE: &str = "control-plane-ca.pem";
/// Lifetime of the projected token; the kubelet rotates it at 80 %.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// The proxy's bootstrap YAML (read by weft-proxy when it has no `--config`).
pub const BOOTSTRAP_ENV: &str = "WEFT_BOOTSTRAP";
/// The control plane's CA roots (PEM), written by weft-proxy to `control_plane_ca`.
pub const CONTROL_PLANE_CA_ENV: &str = "WEFT_CONTROL_PLANE_CA";

/// The proxy's ports in an injected pod (weft-proxy's defaults). The admin port (with
/// `/config_dump` and `/log_level`) listens on the pod's loopback only; the kubelet's probes and
/// Prometheus use the status port (`/metrics`, `/ready`, `/live`, `/app-health/`).
pub const ADMIN_PORT: u16 = 15000;
pub const STATUS_PORT: u16 = 15020;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const DNS_PORT: u16 = 15053;
/// Ports an app container may not claim.
pub const RESERVED_PORTS: [u16; 5] = [
    ADMIN_PORT,
    OUTBOUND_PORT,
    INBOUND_PORT,
    DNS_PORT,
    STATUS_PORT,
];
/// Most ports announced (`transparent.app_ports`).
pub const MAX_APP_PORTS: usize = 64;

/// The `result` values of `weft_inject_requests_total`.
pub const RESULTS: [&str; 5] = ["injected", "skipped", "refused", "error", "malformed"];

/// `weft_inject_requests_total{result}`, registered in the control plane's registry.
#[derive(Debug, Clone)]
pub struct InjectMetrics {
    pub requests_total: IntCounterVec,
}

impl InjectMetrics {
    /// Creates the counter (every result at 0) and registers it in `metrics`.
    pub fn register(metrics: &crate::metrics::Metrics) -> Result<Self, prometheus::Error> {
        let requests_total = IntCounterVec::new(
            prometheus::Opts::new(
                "weft_inject_requests_total",
                "Sidecar injection webhook requests by result: injected (patched), skipped (opted out, already injected, hostNetwork, not a pod creation), refused (the pod's annotations or names cannot make a sidecar), error (the webhook's own failure: admitted unpatched, or denied with --inject-fail-closed), malformed (not an AdmissionReview: 400).",
            ),
            &["result"],
        )?;
        for result in RESULTS {
            requests_total.with_label_values(&[result]);
        }
        metrics.register(Box::new(requests_total.clone()))?;
        Ok(Self { requests_total })
    }

    pub fn count(&self, result: &str) {
        self.requests_total.with_label_values(&[result]).inc();
    }
}
