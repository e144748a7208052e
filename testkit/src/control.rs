//! Starting `weft-control` on loopback and reading its admin API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::bin_path;
use crate::http::{http_get, HttpResponse};
use crate::metrics::Metrics;
use crate::net::{free_addr, next_loopback_ip};
use crate::process::ProcessGuard;
use crate::wait::{wait_until, DEFAULT_WAIT};

/// How to start a control plane. Addresses left `None` get a fresh loopback IP and free ports.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    pub policy_dir: PathBuf,
    pub grpc: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// `--deregister-grace`: how long a disconnected proxy stays registered. Tests default to 1s
    /// (the binary's default is 5s) so that deregistration tests stay quick.
    pub deregister_grace: Duration,
    /// More arguments, appended as given.
    pub extra_args: Vec<String>,
}

impl ControlPlaneConfig {
    /// Defaults for `policy_dir`.
    pub fn new(policy_dir: &Path) -> Self {
        ControlPlaneConfig {
            policy_dir: policy_dir.to_path_buf(),
            grpc: None,
            admin: None,
            deregister_grace: Duration::from_secs(1),
            extra_args: Vec::new(),
        }
    }
}

/// A running `weft-control`.
#[derive(Debug)]
pub struct ControlPlane {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub config: ControlPlaneConfig,
    pub process: ProcessGuard,
}

/// Formats a duration the way the binaries' humantime flags read it (`1500ms`).
pub fn duration_arg(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl ControlPlane {
    /// Starts `weft-control` watching `policy_dir` with free gRPC and admin ports, and waits
    /// until `GET /healthz` answers 200.
    pub async fn start(policy_dir: &Path) -> ControlPlane {
        ControlPlane::start_with(ControlPlaneConfig::new(policy_dir)).await
    }

    /// Starts `weft-control` as `config` says and waits for `/healthz`.
    pub async fn start_with(mut config: ControlPlaneConfig) -> ControlPlane {
        let ip = next_loopback_ip();
        let grpc_addr = *config.grpc.get_or_insert_with(|| free_addr(ip));
        let admin_addr = *config.admin.get_or_insert_with(|| free_addr(ip));
        let mut cmd = Command::new(bin_path("weft-control"));
        cmd.arg("--policies")
            .arg(&config.policy_dir)
            .arg("--grpc")
            .arg(grpc_addr.to_string())
            .arg("--admin")
            .arg(admin_addr.to_string())
            .arg("--deregister-grace")
            .arg(duration_arg(config.deregister_grace))
            .args(&config.extra_args);
        let process = ProcessGuard::spawn("weft-control", cmd);
        let mut cp = ControlPlane {
            grpc_addr,
            admin_addr,
            config,
            process,
        };
        cp.wait_healthy().await;
        cp
    }

    /// Waits until `/healthz` answers 200; panics with the log tail if it never does or the
    /// process exits.
    pub async fn wait_healthy(&mut self) {
        let url = self.admin_url("/healthz");
        let process = &mut self.process;
        wait_until(
            DEFAULT_WAIT,
            "weft-control answers GET /healthz with 200",
            async || {
                if let Some(status) = process.try_exit_status() {
                    panic!(
                        "weft-control exited ({status}) before it was healthy\n{}",
                        process.describe()
                    );
                }
                match http_get(&url).await {
                    Ok(r) if r.status == 200 => Ok(()),
                    Ok(r) => Err(format!("GET {url}: {}", r.summary())),
                    Err(e) => Err(format!("GET {url}: {e:#}")),
                }
            },
        )
        .await;
    }

    /// Stops this control plane and starts a new one with the same addresses and policy dir (a
    /// control-plane restart, as the proxies see it).
    pub async fn restart(self) -> ControlPlane {
        let config = self.config.clone();
        drop(self);
        ControlPlane::start_with(config).await
    }

    /// `http://<grpc addr>`, the `control_plane` of a proxy bootstrap.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `http://<admin addr><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// `GET <admin><path>`, panicking (with the log tail) on a transport error.
    pub async fn get(&self, path: &str) -> HttpResponse {
        let url = self.admin_url(path);
        http_get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:#}\n{}", self.process.describe()))
    }

    /// `GET <admin><path>` expecting 200 JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let resp = self.get(path).await;
        assert_eq!(
            resp.status,
            200,
            "GET {path} on weft-control: {}\n{}",
            resp.summary(),
            self.process.describe()
        );
        resp.json()
    }

    /// `GET /v1/policies`.
    pub async fn policies(&self) -> serde_json::Value {
        self.get_json("/v1/policies").await
    }

    /// `GET /v1/proxies`.
    pub async fn proxies(&self) -> serde_json::Value {
        self.get_json("/v1/proxies").await
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        let resp = self.get("/metrics").await;
        assert_eq!(
            resp.status,
            200,
            "GET /metrics on weft-control: {}",
            resp.summary()
        );
        Metrics::parse(&resp.text())
    }
}
