//! Starting `weft-control` on loopback and reading its admin API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::Method;

use crate::admin::AdminAccess;
use crate::bin_path;
use crate::http::HttpResponse;
use crate::metrics::Metrics;
use crate::net::{free_addrs, next_loopback_ip};
use crate::process::ProcessGuard;
use crate::security::{self, default_ca_dir, ensure_token_secret, CpSecurity};
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
    /// Run a CA (`--ca-dir`): proxies pointed at this control plane certify with their join
    /// token and speak mTLS to each other. Default true.
    pub ca: bool,
    /// `--ca-dir`; `None` = [`crate::security::default_ca_dir`] of the gRPC address.
    pub ca_dir: Option<PathBuf>,
    /// Serve gRPC over TLS (`--grpc-tls`; needs `ca`). Default true. Tests that read the
    /// proxies' plaintext gRPC bytes turn it off.
    pub grpc_tls: bool,
    /// Serve the admin API over TLS with authentication (needs `ca`); false passes
    /// `--insecure-admin`. Default true.
    pub admin_tls: bool,
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
            ca: crate::security::SECURE_BY_DEFAULT,
            ca_dir: None,
            grpc_tls: crate::security::SECURE_BY_DEFAULT,
            admin_tls: crate::security::SECURE_BY_DEFAULT,
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

/// The admin access of a control plane started with `config` at `admin`: HTTPS with the
/// bootstrap token when it has a CA and a secured admin API, else plaintext. Errs while the
/// token or roots are not written yet.
fn access(config: &ControlPlaneConfig, admin: SocketAddr) -> Result<AdminAccess, String> {
    if !(config.ca && config.admin_tls) {
        return Ok(AdminAccess::plain(admin));
    }
    let grpc = config
        .grpc
        .ok_or_else(|| "the control plane's gRPC address is not set".to_owned())?;
    let dir = security::security_of(grpc)
        .ca_dir
        .ok_or_else(|| format!("no CA registered for the control plane at {grpc}"))?;
    let roots = security::roots_pem(&dir);
    let token_file = dir.join("admin-token");
    if !roots.exists() || !token_file.exists() {
        return Err(format!(
            "{} or {} not written yet",
            roots.display(),
            token_file.display()
        ));
    }
    let token = std::fs::read_to_string(&token_file)
        .map_err(|e| format!("{}: {e}", token_file.display()))?;
    Ok(AdminAccess::tls(
        admin,
        &roots,
        Some(token.trim().to_owned()),
    ))
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
        // One batch, so the two ports can never be the same.
        let spare = free_addrs(ip, 2);
        let grpc_addr = *config.grpc.get_or_insert(spare[0]);
        let admin_addr = *config.admin.get_or_insert(spare[1]);
        let mut cmd = Command::new(bin_path("weft-control"));
        cmd.arg("--policies")
            .arg(&config.policy_dir)
            .arg("--grpc")
            .arg(grpc_addr.to_string())
            .arg("--admin")
            .arg(admin_addr.to_string())
            .arg("--deregister-grace")
            .arg(duration_arg(config.deregister_grace));
        let ca_dir = config.ca.then(|| {
            config
                .ca_dir
                .clone()
                .unwrap_or_else(|| default_ca_dir(grpc_addr))
        });
        if let Some(dir) = &ca_dir {
            // Written ahead so proxies spawned before this control plane get valid tokens.
            ensure_token_secret(dir);
            cmd.arg("--ca-dir").arg(dir);
        }
        if config.ca && config.grpc_tls {
            cmd.arg("--grpc-tls");
        } else {
            cmd.arg("--insecure-grpc");
        }
        if !(config.ca && config.admin_tls) {
            cmd.arg("--insecure-admin");
        }
        security::register(
            grpc_addr,
            CpSecurity {
                ca_dir,
                grpc_tls: config.ca && config.grpc_tls,
            },
        );
        cmd.args(&config.extra_args);
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
        let config_view = self.config.clone();
        let admin_addr = self.admin_addr;
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
                let access = match access(&config_view, admin_addr) {
                    Ok(a) => a,
                    Err(e) => return Err(e),
                };
                match access.request(Method::GET, "/healthz", Bytes::new()).await {
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

    /// `https://<grpc addr>` (`http://` when gRPC is plaintext), the `control_plane` of a proxy
    /// bootstrap.
    pub fn grpc_url(&self) -> String {
        if self.grpc_tls() {
            format!("https://{}", self.grpc_addr)
        } else {
            format!("http://{}", self.grpc_addr)
        }
    }

    /// Whether the gRPC port is TLS.
    pub fn grpc_tls(&self) -> bool {
        self.config.ca && self.config.grpc_tls
    }

    /// The CA directory (`None` when started without a CA).
    pub fn ca_dir(&self) -> Option<PathBuf> {
        security::security_of(self.grpc_addr).ca_dir
    }

    /// `<ca-dir>/roots.pem`: the trust bundle (panics without a CA).
    pub fn roots_pem(&self) -> PathBuf {
        let dir = self
            .ca_dir()
            .unwrap_or_else(|| panic!("this control plane runs without a CA"));
        security::roots_pem(&dir)
    }

    /// The join token of `namespace/service` (panics without a CA).
    pub fn join_token(&self, service: &str, namespace: &str) -> String {
        let dir = self
            .ca_dir()
            .unwrap_or_else(|| panic!("this control plane runs without a CA"));
        security::join_token(&dir, service, namespace)
    }

    /// Whether the admin API is HTTPS with authentication.
    pub fn admin_tls(&self) -> bool {
        self.config.ca && self.config.admin_tls
    }

    /// `https://<admin addr><path>` (`http://` for an `--insecure-admin` control plane).
    pub fn admin_url(&self, path: &str) -> String {
        let scheme = if self.admin_tls() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.admin_addr)
    }

    /// How to reach the admin API: HTTPS with the bootstrap admin token (a `write` credential),
    /// or plaintext.
    pub fn admin(&self) -> AdminAccess {
        access(&self.config, self.admin_addr)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.process.describe()))
    }

    /// The `weftctl` arguments that reach this control plane with its bootstrap credential:
    /// `--server <admin url>` and, when secured, `--ca-dir <ca dir>`.
    pub fn weftctl_args(&self) -> Vec<String> {
        let mut args = vec!["--server".to_owned(), self.admin_url("")];
        if let (true, Some(dir)) = (self.admin_tls(), self.ca_dir()) {
            args.push("--ca-dir".to_owned());
            args.push(dir.display().to_string());
        }
        args
    }

    /// `method <admin><path>` with `body` and the bootstrap credential, panicking (with the log
    /// tail) on a transport error.
    pub async fn admin_request(&self, method: Method, path: &str, body: &str) -> HttpResponse {
        self.admin()
            .request(method.clone(), path, Bytes::from(body.to_owned()))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{method} {}: {e:#}\n{}",
                    self.admin_url(path),
                    self.process.describe()
                )
            })
    }

    /// `GET <admin><path>`, panicking (with the log tail) on a transport error.
    pub async fn get(&self, path: &str) -> HttpResponse {
        self.admin_request(Method::GET, path, "").await
    }

    /// `PUT <admin><path>` with `body`.
    pub async fn put(&self, path: &str, body: &str) -> HttpResponse {
        self.admin_request(Method::PUT, path, body).await
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
