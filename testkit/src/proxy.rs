//! Starting `weft-proxy` from a bootstrap YAML (ARCHITECTURE.md) on its own loopback IP, and
//! reading its admin API.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tonic::transport::Channel;

use crate::bin_path;
use crate::control::duration_arg;
use crate::grpc::grpc_channel;
use crate::http::{http_get, HttpClient, HttpResponse};
use crate::metrics::Metrics;
use crate::net::{free_addrs, next_loopback_ip};
use crate::process::ProcessGuard;
use crate::security;
use crate::wait::{wait_until, DEFAULT_WAIT};

/// A proxy's bootstrap: everything its YAML file says.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub service: String,
    pub namespace: String,
    pub id: String,
    pub labels: Vec<(String, String)>,
    /// The loopback IP every listener of this proxy binds (also `tcp_bind_ip`).
    pub ip: IpAddr,
    pub admin: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    /// The local app the inbound listener forwards to.
    pub app: SocketAddr,
    /// `control_plane:` URL, e.g. `ControlPlane::grpc_url()`.
    pub control_plane: String,
    /// More control-plane replicas: with any, the bootstrap lists `control_plane: [control_plane,
    /// these...]` (tried in that order; see [`crate::replicas`]).
    pub control_plane_replicas: Vec<String>,
    /// Runs the proxy through this command (`prefix... weft-proxy --config FILE`), e.g. in a
    /// mount namespace with its own `/etc/hosts` ([`crate::replicas::with_hosts_file`]).
    pub command_prefix: Vec<String>,
    /// Short by default so a stopped proxy with open client connections exits quickly.
    pub drain_timeout: Duration,
    /// `control_plane_ca:` (filled in at spawn from the control plane's CA when `secure`).
    pub control_plane_ca: Option<PathBuf>,
    /// `join_token:` (filled in at spawn from the control plane's CA when `secure`).
    pub join_token: Option<String>,
    /// `cert_ttl:` the certificate lifetime to ask for (`None` = the control plane's default).
    pub cert_ttl: Option<Duration>,
    /// At spawn, point the proxy at its control plane's secure path (https URL, CA, token) as
    /// that control plane runs (see [`crate::security`]). Default true.
    pub secure: bool,
    /// `limits.max_connections_per_listener` (`None`: the proxy's default).
    pub max_connections_per_listener: Option<usize>,
    /// `dns.nameservers`: where endpoints declared by DNS name are resolved (empty: the
    /// system's resolver configuration).
    pub dns_nameservers: Vec<SocketAddr>,
}

impl ProxyConfig {
    /// A proxy for `service` (namespace `default`) with node id `id`, fronting `app`, on a fresh
    /// loopback IP with free admin, inbound and outbound ports.
    pub fn new(control_plane: &str, service: &str, id: &str, app: SocketAddr) -> Self {
        ProxyConfig::on_ip(next_loopback_ip(), control_plane, service, id, app)
    }

    /// Like [`ProxyConfig::new`] on a given IP (e.g. one a policy's `tcp` port was chosen for).
    pub fn on_ip(
        ip: IpAddr,
        control_plane: &str,
        service: &str,
        id: &str,
        app: SocketAddr,
    ) -> Self {
        // One batch, so admin, inbound and outbound never get the same port; and not the
        // app's port when the app shares the IP (it was picked free and released before the
        // app bound it, so the kernel may hand it out again).
        let picks = loop {
            let picks = free_addrs(ip, 3);
            if !picks.contains(&app) {
                break picks;
            }
        };
        let [admin, inbound, outbound] = <[SocketAddr; 3]>::try_from(picks)
            .unwrap_or_else(|_| unreachable!("free_addrs returns exactly n addresses"));
        ProxyConfig {
            service: service.to_string(),
            namespace: "default".to_string(),
            id: id.to_string(),
            labels: Vec::new(),
            ip,
            admin,
            inbound,
            outbound,
            app,
            control_plane: control_plane.to_string(),
            control_plane_replicas: Vec::new(),
            command_prefix: Vec::new(),
            drain_timeout: Duration::from_secs(1),
            control_plane_ca: None,
            join_token: None,
            cert_ttl: None,
            secure: true,
            max_connections_per_listener: None,
            dns_nameservers: Vec::new(),
        }
    }

    /// Fills in the secure path of the control plane this config points at: `https://` when its
    /// gRPC is TLS, `control_plane_ca`, and this service's join token when it runs a CA.
    pub fn resolve_security(&mut self) {
        if !self.secure {
            return;
        }
        let Some(addr) = security::url_addr(&self.control_plane) else {
            return;
        };
        let sec = security::security_of(addr);
        let Some(ca_dir) = sec.ca_dir else {
            return;
        };
        if sec.grpc_tls {
            for url in std::iter::once(&mut self.control_plane)
                .chain(self.control_plane_replicas.iter_mut())
            {
                if let Some(rest) = url.strip_prefix("http://") {
                    *url = format!("https://{rest}");
                }
            }
            if self.control_plane_ca.is_none() {
                self.control_plane_ca = Some(security::roots_pem(&ca_dir));
            }
        }
        if self.join_token.is_none() {
            self.join_token = Some(security::join_token(
                &ca_dir,
                &self.service,
                &self.namespace,
            ));
        }
    }

    /// The bootstrap YAML (`weft-proxy --config FILE`).
    pub fn to_yaml(&self) -> String {
        // JSON strings are valid YAML double-quoted scalars: no escaping to get wrong.
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let labels = self
            .labels
            .iter()
            .map(|(k, v)| format!("{}: {}", q(k), q(v)))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "node:\n  service: {service}\n  namespace: {namespace}\n  id: {id}\n  labels: {{{labels}}}\n\
             admin: {admin}\n\
             control_plane: {cp}\n\
             inbound:\n  address: {inbound}\n  app: {app}\n\
             outbound:\n  address: {outbound}\n  tcp_bind_ip: {ip}\n\
             drain_timeout: {drain}\n{security}",
            service = q(&self.service),
            namespace = q(&self.namespace),
            id = q(&self.id),
            admin = q(&self.admin.to_string()),
            cp = if self.control_plane_replicas.is_empty() {
                q(&self.control_plane)
            } else {
                let all: Vec<String> = std::iter::once(&self.control_plane)
                    .chain(&self.control_plane_replicas)
                    .map(|u| q(u))
                    .collect();
                format!("[{}]", all.join(", "))
            },
            inbound = q(&self.inbound.to_string()),
            app = q(&self.app.to_string()),
            outbound = q(&self.outbound.to_string()),
            ip = q(&self.ip.to_string()),
            drain = duration_arg(self.drain_timeout),
            security = self.security_yaml(),
        )
    }

    fn security_yaml(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut out = String::new();
        if let Some(ca) = &self.control_plane_ca {
            out.push_str(&format!(
                "control_plane_ca: {}\n",
                q(&ca.display().to_string())
            ));
        }
        if let Some(token) = &self.join_token {
            out.push_str(&format!("join_token: {}\n", q(token)));
        }
        if let Some(ttl) = self.cert_ttl {
            out.push_str(&format!("cert_ttl: {}\n", duration_arg(ttl)));
        }
        if let Some(max) = self.max_connections_per_listener {
            out.push_str(&format!("limits:\n  max_connections_per_listener: {max}\n"));
        }
        if !self.dns_nameservers.is_empty() {
            let servers: Vec<String> = self
                .dns_nameservers
                .iter()
                .map(|a| q(&a.to_string()))
                .collect();
            out.push_str(&format!("dns:\n  nameservers: [{}]\n", servers.join(", ")));
        }
        out
    }
}

/// The `versions` object of a proxy's `/config_dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigVersions {
    pub listeners: String,
    pub routes: String,
    pub clusters: String,
    pub endpoints: String,
    pub policies: String,
    pub trust: String,
}

impl ConfigVersions {
    /// Reads `dump["versions"]`; a missing or non-string version reads as "".
    pub fn from_dump(dump: &serde_json::Value) -> Self {
        let v = |t: &str| match &dump["versions"][t] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        ConfigVersions {
            listeners: v("listeners"),
            routes: v("routes"),
            clusters: v("clusters"),
            endpoints: v("endpoints"),
            policies: v("policies"),
            trust: v("trust"),
        }
    }
}

/// A running `weft-proxy`.
#[derive(Debug)]
pub struct Proxy {
    pub config: ProxyConfig,
    pub config_path: PathBuf,
    pub process: ProcessGuard,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts a proxy for `service` (see [`ProxyConfig::new`]) and waits for `/ready`.
    pub async fn start(control_plane: &str, service: &str, id: &str, app: SocketAddr) -> Proxy {
        Proxy::start_with(ProxyConfig::new(control_plane, service, id, app)).await
    }

    /// Starts a proxy from `config` and waits until `/ready` answers 200.
    pub async fn start_with(config: ProxyConfig) -> Proxy {
        let mut proxy = Proxy::spawn(config);
        proxy.wait_ready().await;
        proxy
    }

    /// Writes the bootstrap and starts the proxy without waiting for anything.
    pub fn spawn(mut config: ProxyConfig) -> Proxy {
        config.resolve_security();
        let yaml = config.to_yaml();
        Proxy::spawn_yaml(config, &yaml)
    }

    /// Starts a proxy with a hand-written bootstrap `yaml` (e.g. an invalid one); `config` only
    /// names the addresses the helpers use.
    pub fn spawn_yaml(config: ProxyConfig, yaml: &str) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-proxy-{}-", config.id))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a dir for {}'s bootstrap: {e}", config.id));
        let config_path = dir.path().join("bootstrap.yaml");
        std::fs::write(&config_path, yaml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut cmd = match config.command_prefix.split_first() {
            None => Command::new(bin_path("weft-proxy")),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin_path("weft-proxy"));
                c
            }
        };
        cmd.arg("--config").arg(&config_path);
        let process = ProcessGuard::spawn(&format!("weft-proxy[{}]", config.id), cmd);
        Proxy {
            config,
            config_path,
            process,
            _dir: dir,
        }
    }

    /// Waits until `/ready` answers 200; panics with the log tail if the proxy exits first.
    pub async fn wait_ready(&mut self) {
        let url = self.admin_url("/ready");
        let what = format!("weft-proxy {} answers GET /ready with 200", self.config.id);
        let process = &mut self.process;
        wait_until(DEFAULT_WAIT, &what, async || {
            if let Some(status) = process.try_exit_status() {
                panic!(
                    "{} exited ({status}) before it was ready\n{}",
                    process.name(),
                    process.describe()
                );
            }
            match http_get(&url).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("GET {url}: {}", r.summary())),
                Err(e) => Err(format!("GET {url}: {e:#}")),
            }
        })
        .await;
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn ip(&self) -> IpAddr {
        self.config.ip
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.config.admin
    }

    /// The inbound listener: what the control plane registers as this instance's endpoint.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.config.inbound
    }

    /// The outbound HTTP listener the local app calls.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.config.outbound
    }

    /// `http://<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.admin)
    }

    /// An HTTP/1.1 client of the outbound listener (the local app's view of the mesh).
    pub fn http1(&self) -> HttpClient {
        HttpClient::h1(self.outbound_addr())
    }

    /// An h2c client of the outbound listener.
    pub fn h2c(&self) -> HttpClient {
        HttpClient::h2c(self.outbound_addr())
    }

    /// A gRPC channel to service `authority` through the outbound listener.
    pub fn grpc(&self, authority: &str) -> Channel {
        grpc_channel(self.outbound_addr(), authority)
    }

    /// `GET <admin><path>`, panicking with the log tail on a transport error.
    pub async fn admin_get(&self, path: &str) -> HttpResponse {
        let url = self.admin_url(path);
        http_get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:#}\n{}", self.process.describe()))
    }

    /// `GET /config_dump` as JSON.
    pub async fn config_dump(&self) -> serde_json::Value {
        let resp = self.admin_get("/config_dump").await;
        assert_eq!(
            resp.status,
            200,
            "GET /config_dump on {}: {}",
            self.id(),
            resp.summary()
        );
        resp.json()
    }

    /// The resource versions `/config_dump` reports.
    pub async fn versions(&self) -> ConfigVersions {
        ConfigVersions::from_dump(&self.config_dump().await)
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        let resp = self.admin_get("/metrics").await;
        assert_eq!(
            resp.status,
            200,
            "GET /metrics on {}: {}",
            self.id(),
            resp.summary()
        );
        Metrics::parse(&resp.text())
    }

    /// Waits until `name{labels}` (summed over the matching series) reaches `at_least`;
    /// returns that scrape.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> Metrics {
        let what = format!("{} reports {name}{labels:?} >= {at_least}", self.id());
        wait_until(DEFAULT_WAIT, &what, async || {
            let m = self.metrics().await;
            if m.sum(name, labels) >= at_least {
                Ok(m)
            } else {
                Err(m.lines_for(name))
            }
        })
        .await
    }

    /// Waits until this proxy's `/config_dump` endpoints mention (`present`) or no longer mention
    /// `addr`, i.e. the control plane pushed an endpoint (de)registration.
    pub async fn wait_endpoint(&self, addr: SocketAddr, present: bool) {
        let needle = addr.to_string();
        let what = format!(
            "{}'s /config_dump endpoints {} {needle}",
            self.id(),
            if present {
                "include"
            } else {
                "no longer include"
            }
        );
        wait_until(DEFAULT_WAIT, &what, async || {
            let resp = http_get(&self.admin_url("/config_dump")).await?;
            let dump: serde_json::Value = serde_json::from_slice(&resp.body)?;
            let endpoints = dump["endpoints"].to_string();
            if endpoints.contains(&needle) == present {
                Ok(())
            } else {
                Err(anyhow::anyhow!("endpoints: {endpoints}"))
            }
        })
        .await;
    }
}
