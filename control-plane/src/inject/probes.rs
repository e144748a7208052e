//! Kubelet probes of an injected pod, rewritten so they still reach the app through capture.
//!
//! The kubelet probes the pod's IP from the node. With inbound capture an `httpGet` would reach
//! the proxy's inbound listener as plaintext from an unknown peer, and strict mTLS refuses it;
//! a `tcpSocket` probe would only prove the proxy accepts. Excluding the probe ports from
//! capture would take those ports (often the app's only port) out of the mesh. So each
//! `httpGet`, `tcpSocket` and `grpc` probe becomes an `httpGet` on the proxy's status port
//! (never captured) at `/app-health/<container>/<livez|readyz|startupz>`, keeping its timing,
//! and the original check travels to the proxy in `WEFT_APP_PROBES` (JSON, [`AppProbe`] by
//! path). The proxy runs it against the app on the pod's IP as the kubelet would (uncaptured:
//! the proxy's own traffic) and answers 200 or 503. `exec` probes run inside the container and
//! are left alone.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// The env var carrying the rewritten probes to the proxy.
pub const APP_PROBES_ENV: &str = "WEFT_APP_PROBES";

/// Path prefix the proxy's admin server answers probes on.
pub const PATH_PREFIX: &str = "/app-health/";

/// One original probe, as the proxy runs it (the format of `WEFT_APP_PROBES`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AppProbe {
    Http {
        port: u16,
        path: String,
        /// `HTTP` or `HTTPS` (certificate not verified, as the kubelet does).
        scheme: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<(String, String)>,
        timeout_seconds: u32,
    },
    Tcp {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        timeout_seconds: u32,
    },
    Grpc {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        timeout_seconds: u32,
    },
}

/// The probes of a pod, by admin path.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// A probe's kind, as named in its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [Self::Liveness, Self::Readiness, Self::Startup];

    /// The container field (`livenessProbe`, ...).
    pub fn field(self) -> &'static str {
        match self {
            Self::Liveness => "livenessProbe",
            Self::Readiness => "readinessProbe",
            Self::Startup => "startupProbe",
        }
    }

    fn path_name(self) -> &'static str {
        match self {
            Self::Liveness => "livez",
            Self::Readiness => "readyz",
            Self::Startup => "startupz",
        }
    }

    pub fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            Self::Liveness => c.liveness_probe.as_ref(),
            Self::Readiness => c.readiness_probe.as_ref(),
            Self::Startup => c.startup_probe.as_ref(),
        }
    }
}

/// What rewriting one probe gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Rewrite {
    /// The new probe (on the proxy's status port) and the original check for the proxy.
    Rewritten {
        probe: Box<Probe>,
        path: String,
        original: AppProbe,
    },
    /// Left as it is (an `exec` probe, or no handler).
    Kept,
    /// Cannot be rewritten: why (it is left as it is).
    Unresolvable(String),
}

/// Rewrites `container`'s probe of `kind` to the proxy's status port `status_port`.
pub fn rewrite(container: &Container, kind: ProbeKind, status_port: u16) -> Rewrite {
    let Some(probe) = kind.of(container) else {
        return Rewrite::Kept;
    };
    let timeout_seconds = probe
        .timeout_seconds
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(1);
    let resolve = |port: &IntOrString| -> Result<u16, String> {
        let number = match port {
            IntOrString::Int(n) => *n,
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| {
                    format!(
                        "container {} {}: no port named {name:?}",
                        container.name,
                        kind.field()
                    )
                })?,
        };
        u16::try_from(number)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                format!(
                    "container {} {}: port {number} is not a port",
                    container.name,
                    kind.field()
                )
            })
    };
    let original = if let Some(http) = &probe.http_get {
        let port = match resolve(&http.port) {
            Ok(p) => p,
            Err(e) => return Rewrite::Unresolvable(e),
        };
        AppProbe::Http {
            port,
            path: http.path.clone().unwrap_or_else(|| "/".to_owned()),
            scheme: http
                .scheme
                .clone()
                .unwrap_or_else(|| "HTTP".to_owned())
                .to_ascii_uppercase(),
            host: http.host.clone().filter(|h| !h.is_empty()),
            headers: http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
            timeout_seconds,
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        let port = match resolve(&tcp.port) {
            Ok(p) => p,
            Err(e) => return Rewrite::Unresolvable(e),
        };
        AppProbe::Tcp {
            port,
            host: tcp.host.clone().filter(|h| !h.is_empty()),
            timeout_seconds,
        }
    } else if let Some(grpc) = &probe.grpc {
        let port = match resolve(&IntOrString::Int(grpc.port)) {
            Ok(p) => p,
            Err(e) => return Rewrite::Unresolvable(e),
        };
        AppProbe::Grpc {
            port,
            service: grpc.service.clone().filter(|s| !s.is_empty()),
            timeout_seconds,
        }
    } else {
        return Rewrite::Kept;
    };
    let path = format!("{PATH_PREFIX}{}/{}", container.name, kind.path_name());
    let rewritten = Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.clone()),
            port: IntOrString::Int(i32::from(status_port)),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        exec: None,
        tcp_socket: None,
        grpc: None,
        ..probe.clone()
    };
    Rewrite::Rewritten {
        probe: Box::new(rewritten),
        path,
        original,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction, GRPCAction, TCPSocketAction};

    fn container() -> Container {
        Container {
            name: "web".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        }
    }

    #[test]
    fn http_tcp_and_grpc_probes_go_to_the_status_port_keeping_their_timing() {
        let mut c = container();
        c.liveness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::String("http".into()),
                http_headers: Some(vec![k8s_openapi::api::core::v1::HTTPHeader {
                    name: "X-Probe".into(),
                    value: "1".into(),
                }]),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(7),
            timeout_seconds: Some(3),
            failure_threshold: Some(4),
            ..Probe::default()
        });
        c.readiness_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(8080),
                host: None,
            }),
            ..Probe::default()
        });
        c.startup_probe = Some(Probe {
            grpc: Some(GRPCAction {
                port: 9090,
                service: Some("ready".into()),
            }),
            ..Probe::default()
        });
        let Rewrite::Rewritten {
            probe,
            path,
            original,
        } = rewrite(&c, ProbeKind::Liveness, 15020)
        else {
            panic!("not rewritten")
        };
        assert_eq!(path, "/app-health/web/livez");
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.port, IntOrString::Int(15020));
        assert_eq!(get.path.as_deref(), Some("/app-health/web/livez"));
        assert_eq!(
            (
                probe.period_seconds,
                probe.timeout_seconds,
                probe.failure_threshold
            ),
            (Some(7), Some(3), Some(4))
        );
        assert_eq!(
            original,
            AppProbe::Http {
                port: 8080,
                path: "/healthz".into(),
                scheme: "HTTP".into(),
                host: None,
                headers: vec![("X-Probe".into(), "1".into())],
                timeout_seconds: 3
            }
        );
        let Rewrite::Rewritten {
            original, probe, ..
        } = rewrite(&c, ProbeKind::Readiness, 15020)
        else {
            panic!("not rewritten")
        };
        assert!(probe.tcp_socket.is_none());
        assert_eq!(
            original,
            AppProbe::Tcp {
                port: 8080,
                host: None,
                timeout_seconds: 1
            }
        );
        let Rewrite::Rewritten {
            original, probe, ..
        } = rewrite(&c, ProbeKind::Startup, 15020)
        else {
            panic!("not rewritten")
        };
        assert!(probe.grpc.is_none());
        assert_eq!(
            serde_json::to_value(&original).unwrap(),
            serde_json::json!({"grpc": {"port": 9090, "service": "ready", "timeout_seconds": 1}})
        );
    }

    #[test]
    fn exec_probes_stay_and_unknown_named_ports_are_reported() {
        let mut c = container();
        c.liveness_probe = Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec!["true".into()]),
            }),
            ..Probe::default()
        });
        c.readiness_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("metrics".into()),
                host: None,
            }),
            ..Probe::default()
        });
        assert_eq!(rewrite(&c, ProbeKind::Liveness, 15020), Rewrite::Kept);
        assert_eq!(rewrite(&c, ProbeKind::Startup, 15020), Rewrite::Kept);
        assert!(matches!(
            rewrite(&c, ProbeKind::Readiness, 15020),
            Rewrite::Unresolvable(e) if e.contains("\"metrics\"")
        ));
    }
}
