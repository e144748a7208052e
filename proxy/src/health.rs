//! Active health checks: per cluster, optionally, an HTTP GET (path, expected statuses) or a TCP
//! connect to every endpoint each interval, over mesh mTLS when the endpoint is a mesh endpoint
//! (expects an identity) and this proxy has one, exactly like the data path's connections (a
//! `mtls: strict` sidecar refuses plaintext). `unhealthy_threshold` failures in a row take an
//! endpoint out of load balancing; `healthy_threshold` successes in a row bring it back.
//!
//! One task per checked cluster, started when a snapshot first gives the cluster a health check
//! and ended when the cluster's long-lived state is dropped or the check is removed. It runs on
//! the runtime that builds snapshots (the control thread's), off the data path. Verdicts land in
//! each endpoint's [`EndpointHealth`], which the balancer reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proto::v1;

use crate::outlier::{EndpointHealth, OutlierState};
use crate::resilience_metrics::ClusterResilienceMetrics;

/// What is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `GET path` with `Host: host`; healthy if the status is in `expected` (empty = 200..=399).
    Http {
        /// Request path.
        path: Box<str>,
        /// Host header ("" = the endpoint address).
        host: Box<str>,
        /// Healthy statuses.
        expected: Box<[u16]>,
    },
    /// TCP connect.
    Tcp,
}

/// A cluster's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// What is checked.
    pub kind: CheckKind,
    /// Default 5s.
    pub interval: Duration,
    /// Default 1s.
    pub timeout: Duration,
    /// Default 2.
    pub healthy_threshold: u32,
    /// Default 3.
    pub unhealthy_threshold: u32,
}

impl HealthCheckConfig {
    /// From the proto; `Ok(None)` when absent. `Err` names the bad field.
    pub fn from_proto(p: Option<&v1::HealthCheck>) -> Result<Option<Self>, (&'static str, String)> {
        let Some(p) = p else {
            return Ok(None);
        };
        let kind = match &p.kind {
            Some(v1::health_check::Kind::Http(h)) => {
                let path = if h.path.is_empty() { "/" } else { &h.path };
                if !path.starts_with('/') || path.contains(char::is_whitespace) {
                    return Err(("health_check.http.path", format!("invalid path {path:?}")));
                }
                let mut expected = Vec::new();
                for &s in &h.expected_statuses {
                    match u16::try_from(s) {
                        Ok(s) if (100..=599).contains(&s) => expected.push(s),
                        _ => {
                            return Err((
                                "health_check.http.expected_statuses",
                                format!("{s} is not an HTTP status"),
                            ))
                        }
                    }
                }
                if h.host.contains(char::is_whitespace) {
                    return Err((
                        "health_check.http.host",
                        format!("invalid host {:?}", h.host),
                    ));
                }
                CheckKind::Http {
                    path: path.into(),
                    host: h.host.as_str().into(),
                    expected: expected.into(),
                }
            }
            Some(v1::health_check::Kind::Tcp(_)) => CheckKind::Tcp,
            None => return Err(("health_check", "needs http or tcp".into())),
        };
        let or = |v: u64, d: u64| Duration::from_millis(if v == 0 { d } else { v });
        Ok(Some(Self {
            kind,
            interval: or(p.interval_ms, 5_000),
            timeout: or(p.timeout_ms, 1_000),
            healthy_threshold: if p.healthy_threshold == 0 {
                2
            } else {
                p.healthy_threshold
            },
            unhealthy_threshold: if p.unhealthy_threshold == 0 {
                3
            } else {
                p.unhealthy_threshold
            },
        }))
    }
}

/// One endpoint to check.
#[derive(Debug, Clone)]
pub struct Target {
    /// Address.
    pub addr: SocketAddr,
    /// Where the verdict goes.
    pub health: Arc<EndpointHealth>,
    /// The identity the endpoint's sidecar must present (checked over mTLS), as for the data
    /// path's connections to it.
    pub expect: crate::tls::Expect,
}

/// A cluster's health checker (part of its long-lived state).
#[derive(Debug)]
pub struct HealthChecker {
    config: ArcSwapOption<HealthCheckConfig>,
    targets: ArcSwap<Vec<Target>>,
    running: AtomicBool,
    outlier: Arc<OutlierState>,
    metrics: ClusterResilienceMetrics,
}

impl HealthChecker {
    /// A checker that notes unhealthy endpoints in `outlier` (so the balancer re-evaluates).
    pub fn new(outlier: Arc<OutlierState>, metrics: ClusterResilienceMetrics) -> Self {
        Self {
            config: ArcSwapOption::empty(),
            targets: ArcSwap::from_pointee(Vec::new()),
            running: AtomicBool::new(false),
            outlier,
            metrics,
        }
    }

    /// Applies a snapshot's check and endpoints; starts the task if needed and a runtime is
    /// available. Endpoints no longer checked are marked healthy again.
    pub fn update(self: &Arc<Self>, config: Option<HealthCheckConfig>, targets: Vec<Target>) {
        if config.is_none() {
            for t in self.targets.load().iter() {
                t.health.set_checked_healthy(true);
            }
        }
        // `weft_endpoint_healthy` exists for checked endpoints only (endpoints come and go with
        // every rollout: their series must not pile up).
        for t in self.targets.load().iter() {
            if config.is_none() || !targets.iter().any(|n| n.addr == t.addr) {
                self.metrics.remove_endpoint_healthy(&t.addr.to_string());
            }
        }
        let enabled = config.is_some();
        self.config.store(config.map(Arc::new));
        self.targets.store(Arc::new(targets));
        if enabled && !self.running.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(run(Arc::downgrade(self)));
                }
                Err(_) => self.running.store(false, Ordering::Release),
            }
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        // The cluster is gone: so are its endpoints' verdicts.
        for t in self.targets.load().iter() {
            self.metrics.remove_endpoint_healthy(&t.addr.to_string());
        }
    }
}

async fn run(checker: Weak<HealthChecker>) {
    let mut streaks: HashMap<SocketAddr, (u32, u32)> = HashMap::new();
    loop {
        let interval = {
            let Some(c) = checker.upgrade() else { return };
            let Some(cfg) = c.config.load_full() else {
                c.running.store(false, Ordering::Release);
                return;
            };
            let targets = c.targets.load_full();
            let results = futures::future::join_all(targets.iter().map(|t| check(&cfg, t))).await;
            streaks.retain(|a, _| targets.iter().any(|t| t.addr == *a));
            // Endpoints removed while the checks ran get no verdict (nor a series back). This
            // and `update` run on the same single-threaded runtime: no interleaving here.
            let current = c.targets.load_full();
            for (t, ok) in targets.iter().zip(results) {
                if !current.iter().any(|n| n.addr == t.addr) {
                    continue;
                }
                let s = streaks.entry(t.addr).or_default();
                if ok {
                    *s = (s.0 + 1, 0);
                } else {
                    *s = (0, s.1 + 1);
                    c.metrics.health_check_failures.inc();
                }
                let healthy = t.health.is_checked_healthy();
                let verdict = if healthy && s.1 >= cfg.unhealthy_threshold {
                    Some(false)
                } else if !healthy && s.0 >= cfg.healthy_threshold {
                    Some(true)
                } else {
                    None
                };
                if let Some(v) = verdict {
                    t.health.set_checked_healthy(v);
                    if !v {
                        c.outlier.note_unavailable();
                    }
                    tracing::info!(endpoint = %t.addr, healthy = v, "health check verdict changed");
                }
                c.metrics
                    .set_endpoint_healthy(&t.addr.to_string(), t.health.is_checked_healthy());
            }
            cfg.interval
        };
        tokio::time::sleep(interval).await;
    }
}

/// One check of `target`; `true` = healthy.
pub async fn check(cfg: &HealthCheckConfig, target: &Target) -> bool {
    tokio::time::timeout(cfg.timeout, check_inner(&cfg.kind, target))
        .await
        .unwrap_or(false)
}

async fn check_inner(kind: &CheckKind, target: &Target) -> bool {
    let addr = target.addr;
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    // A mesh endpoint: the mTLS handshake (verifying its identity) is part of the check.
    let io = match crate::tls::originate(tcp, addr.ip(), &target.expect, crate::tls::Alpn::Http1)
        .await
    {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!(endpoint = %addr, error = %e, "health check: mTLS handshake failed");
            return false;
        }
    };
    exchange(kind, addr, io).await
}

/// The HTTP part of a check on an established connection (TCP checks: nothing more to do).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    kind: &CheckKind,
    addr: SocketAddr,
    mut s: S,
) -> bool {
    let CheckKind::Http {
        path,
        host,
        expected,
    } = kind
    else {
        return true;
    };
    let host = if host.is_empty() {
        addr.to_string()
    } else {
        host.to_string()
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: weft-health-check\r\nconnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    // The status line is in the first 12 bytes ("HTTP/1.1 200"); bounded by the buffer size.
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
    }
    let status = std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(st) if buf.starts_with(b"HTTP/1.") => {
            if expected.is_empty() {
                (200..=399).contains(&st)
            } else {
                expected.contains(&st)
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Polls `cond` every 10ms for up to 5s.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened within 5s: {what}");
    }

    async fn http_server(status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    fn http_cfg(expected: Vec<u32>) -> HealthCheckConfig {
        HealthCheckConfig::from_proto(Some(&v1::HealthCheck {
            kind: Some(v1::health_check::Kind::Http(v1::HttpHealthCheck {
                path: "/healthz".into(),
                expected_statuses: expected,
                host: String::new(),
            })),
            interval_ms: 20,
            timeout_ms: 200,
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }))
        .unwrap()
        .unwrap()
    }

    /// A plaintext (non-mesh) target at `addr`.
    fn plain(addr: SocketAddr) -> Target {
        Target {
            addr,
            health: Arc::new(EndpointHealth::default()),
            expect: crate::tls::Expect::Plain,
        }
    }

    #[tokio::test]
    async fn http_and_tcp_checks() {
        let ok = http_server("200 OK").await;
        let bad = http_server("503 Service Unavailable").await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let c = http_cfg(vec![]);
        assert!(check(&c, &plain(ok)).await);
        assert!(!check(&c, &plain(bad)).await);
        assert!(!check(&c, &plain(closed)).await);
        assert!(check(&http_cfg(vec![503]), &plain(bad)).await);
        let tcp = HealthCheckConfig {
            kind: CheckKind::Tcp,
            ..c
        };
        assert!(check(&tcp, &plain(bad)).await);
        assert!(!check(&tcp, &plain(closed)).await);
    }

    #[tokio::test]
    async fn black_hole_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let c = http_cfg(vec![]);
        assert!(!check(&c, &plain(addr)).await);
    }

    #[tokio::test]
    async fn checker_marks_unhealthy_and_back() {
        let ok = http_server("200 OK").await;
        let outlier = Arc::new(OutlierState::default());
        let m = ClusterResilienceMetrics::detached("c");
        let checker = Arc::new(HealthChecker::new(Arc::clone(&outlier), m.clone()));
        let good = Arc::new(EndpointHealth::default());
        let dead = Arc::new(EndpointHealth::default());
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        checker.update(
            Some(http_cfg(vec![])),
            vec![
                Target {
                    addr: ok,
                    health: Arc::clone(&good),
                    expect: crate::tls::Expect::Plain,
                },
                Target {
                    addr: closed,
                    health: Arc::clone(&dead),
                    expect: crate::tls::Expect::Plain,
                },
            ],
        );
        eventually("dead endpoint marked unhealthy", || {
            !dead.is_checked_healthy()
        })
        .await;
        assert!(good.is_checked_healthy());
        assert!(m.health_check_failures.get() >= 2);
        // The endpoint comes back: a server on the same port is healthy again.
        let l = TcpListener::bind(closed).await.unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        eventually("endpoint back in rotation", || dead.is_checked_healthy()).await;
        // Removing the check stops the task and restores every endpoint.
        checker.update(None, vec![]);
        eventually("task stopped", || !checker.running.load(Ordering::Acquire)).await;
    }

    #[test]
    fn config_defaults_and_errors() {
        let c = HealthCheckConfig::from_proto(Some(&v1::HealthCheck {
            kind: Some(v1::health_check::Kind::Tcp(true)),
            ..Default::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold), (2, 3));
        assert!(HealthCheckConfig::from_proto(Some(&v1::HealthCheck::default())).is_err());
    }
}
