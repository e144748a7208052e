//! The bootstrap's `observability:` section (ARCHITECTURE.md "Bootstrap YAML"): access log,
//! trace propagation/export and the per-request metrics switch. Unknown fields are errors.

use serde::Deserialize;

/// `observability:`; every part is off (or default) when absent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// Per-request access log; absent = off (no formatting, no allocation per request).
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    /// Trace propagation and span export; absent = `traceparent` passes through untouched.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Metric switches.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `observability.access_log:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Listener names (`inbound`, `outbound`, ...) to log; empty = every HTTP listener.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Line format.
    #[serde(default)]
    pub format: LogFormat,
    /// `stdout` or a file path (appended to).
    #[serde(default = "default_log_path")]
    pub path: String,
}

/// Access log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Envoy-like text.
    Text,
}

/// `observability.tracing:`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Probability that an inbound request without `traceparent` starts a sampled trace.
    #[serde(default)]
    pub sampling: f64,
    /// OTLP/gRPC collector URL: `http://host:port` (plaintext) or `https://host:port` (TLS,
    /// verified with `otlp_ca_file`); absent = spans are not exported.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// PEM CA certificate(s) that an `https://` collector's certificate must chain to.
    #[serde(default)]
    pub otlp_ca_file: Option<std::path::PathBuf>,
    /// `service.name` of exported spans; default `node.service`.
    #[serde(default)]
    pub service_name: Option<String>,
}

/// `observability.metrics:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Per-request metrics (`weft_requests_total`, the duration histograms, body bytes).
    #[serde(default = "yes")]
    pub requests: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { requests: true }
    }
}

fn yes() -> bool {
    true
}

fn default_log_path() -> String {
    STDOUT.to_owned()
}

/// The `path` meaning standard output.
pub const STDOUT: &str = "stdout";

impl ObservabilityConfig {
    /// Checks values serde cannot: `Err((field, reason))` names the dotted field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(log) = &self.access_log {
            if log.path.trim().is_empty() {
                return Err((
                    "observability.access_log.path",
                    "must be `stdout` or a file path".into(),
                ));
            }
            if log.listeners.iter().any(String::is_empty) {
                return Err((
                    "observability.access_log.listeners",
                    "listener names must not be empty".into(),
                ));
            }
        }
        if let Some(t) = &self.tracing {
            if !(0.0..=1.0).contains(&t.sampling) {
                return Err((
                    "observability.tracing.sampling",
                    format!("{} is not a probability in [0, 1]", t.sampling),
                ));
            }
            if let Some(url) = &t.otlp_endpoint {
                match url.parse::<http::Uri>() {
                    Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => {}
                    Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {
                        if t.otlp_ca_file.is_none() {
                            return Err((
                                "observability.tracing.otlp_ca_file",
                                format!(
                                    "{url:?} is https://: set otlp_ca_file to the PEM CA that \
                                     verifies the collector"
                                ),
                            ));
                        }
                    }
                    _ => {
                        return Err((
                            "observability.tracing.otlp_endpoint",
                            format!(
                                "{url:?} is not an http://host:port or https://host:port URL \
                                 (OTLP/gRPC)"
                            ),
                        ))
                    }
                }
            }
            if t.service_name.as_deref() == Some("") {
                return Err((
                    "observability.tracing.service_name",
                    "must not be empty (omit it for node.service)".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ObservabilityConfig, String> {
        let c: ObservabilityConfig = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        c.validate().map_err(|(f, r)| format!("{f}: {r}"))?;
        Ok(c)
    }

    #[test]
    fn parses_the_documented_example() {
        let c = parse(
            "
access_log:
  listeners: [inbound, outbound]
  format: json
  path: stdout
tracing:
  sampling: 0.0
  otlp_endpoint: http://127.0.0.1:4317
  service_name: web
metrics:
  requests: true
",
        )
        .unwrap();
        let log = c.access_log.unwrap();
        assert_eq!(log.listeners, ["inbound", "outbound"]);
        assert_eq!(log.format, LogFormat::Json);
        assert_eq!(log.path, "stdout");
        let t = c.tracing.unwrap();
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(t.service_name.as_deref(), Some("web"));
        assert!(c.metrics.requests);
    }

    #[test]
    fn defaults() {
        let c = parse("{}").unwrap();
        assert_eq!(c, ObservabilityConfig::default());
        assert!(c.access_log.is_none() && c.tracing.is_none() && c.metrics.requests);
        let c = parse("access_log: {}\ntracing: {}\nmetrics: {requests: false}").unwrap();
        let log = c.access_log.unwrap();
        assert_eq!((log.format, log.path.as_str()), (LogFormat::Json, "stdout"));
        assert!(log.listeners.is_empty());
        assert_eq!(c.tracing.unwrap().sampling, 0.0);
        assert!(!c.metrics.requests);
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse("access_log: {formt: json}").unwrap_err();
        assert!(e.contains("formt"), "{e}");
        let e = parse("access_log: {format: xml}").unwrap_err();
        assert!(e.contains("xml") || e.contains("format"), "{e}");
        let e = parse("tracing: {sampling: 1.5}").unwrap_err();
        assert!(e.contains("observability.tracing.sampling"), "{e}");
        let e = parse("tracing: {otlp_endpoint: 'localhost:4317'}").unwrap_err();
        assert!(e.contains("otlp_endpoint"), "{e}");
        let e = parse("tracing: {otlp_endpoint: 'https://c:4317'}").unwrap_err();
        assert!(e.contains("otlp_ca_file"), "{e}");
        let ok = parse("tracing: {otlp_endpoint: 'https://c:4317', otlp_ca_file: /etc/ca.pem}");
        assert!(ok.is_ok(), "{ok:?}");
        let e = parse("access_log: {path: ''}").unwrap_err();
        assert!(e.contains("access_log.path"), "{e}");
        let e = parse("metrics: {request: true}").unwrap_err();
        assert!(e.contains("request"), "{e}");
    }
}

#[cfg(test)]
mod bootstrap_tests {
    use crate::config::Bootstrap;

    #[test]
    fn bootstrap_carries_the_section() {
        let b = Bootstrap::parse("node: {service: web}", "b.yaml").unwrap();
        assert!(b.observability.access_log.is_none() && b.observability.tracing.is_none());
        let b = Bootstrap::parse(
            "node: {service: web}\nobservability:\n  access_log: {path: /tmp/x.log, format: text}\n  tracing: {sampling: 0.5}\n",
            "b.yaml",
        )
        .unwrap();
        assert_eq!(b.observability.access_log.unwrap().path, "/tmp/x.log");
        let e = Bootstrap::parse(
            "node: {service: web}\nobservability: {tracing: {sampling: 2}}",
            "b.yaml",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("observability.tracing.sampling"),
            "{e}"
        );
        let e = Bootstrap::parse(
            "node: {service: web}\nobservability: {acces_log: {}}",
            "b.yaml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("acces_log"), "{e}");
    }
}
