//! The bootstrap file (`weft-proxy --config FILE`): who this proxy is, where its control plane
//! and admin port are, and the addresses it announces. Format in ARCHITECTURE.md; unknown fields
//! are errors that name the field.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors loading the bootstrap file.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The file could not be read.
    #[error("reading bootstrap {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown field or a bad value (serde names the field).
    #[error("bootstrap {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// serde_yaml's error, which carries the field path and line.
        source: serde_yaml::Error,
    },
    /// A field parsed but its value is unusable.
    #[error("bootstrap {path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Dotted field path, e.g. `control_plane`.
        field: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
}

/// The parsed bootstrap.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// Identity of this proxy.
    pub node: NodeConfig,
    /// Admin HTTP address.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Optional status address: a second, read-only listener serving only `/metrics`, `/ready`,
    /// `/live` and `/app-health/` (for the kubelet and Prometheus), so that `admin` (with
    /// `/config_dump`) can stay on loopback. Off by default.
    #[serde(default)]
    pub status: Option<SocketAddr>,
    /// Control-plane gRPC URL(s): one URL, or a list of the replicas' URLs, tried in order
    /// (every address of each URL's host; see `crate::discovery::targets`).
    #[serde(
        default = "default_control_plane",
        deserialize_with = "control_plane_urls"
    )]
    pub control_plane: Vec<String>,
    /// Inbound side: announced address and the local app.
    #[serde(default)]
    pub inbound: InboundConfig,
    /// Outbound side: the HTTP listener and the IP for TCP service ports.
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// How long a removed listener (or a shutting-down proxy) may finish open connections.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Access log, trace propagation/export and metric switches (see [`crate::observe`]).
    #[serde(default)]
    pub observability: crate::observe::ObservabilityConfig,
    /// Data-path worker threads; `None` = one per CPU. `WEFT_WORKER_THREADS` overrides it
    /// (applied by [`Bootstrap::load`]); see [`Bootstrap::worker_threads`].
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// PEM file of the CA(s) that verify the control plane's gRPC certificate (required for an
    /// `https://` control plane; read at every connect attempt, so it may appear later).
    #[serde(default)]
    pub control_plane_ca: Option<PathBuf>,
    /// This service's join token: enables the mesh identity (mTLS).
    #[serde(default)]
    pub join_token: Option<String>,
    /// A file holding the join token (read before every certificate request).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// Certificate lifetime to ask for; absent = the control plane's default.
    #[serde(default, with = "humantime_serde")]
    pub cert_ttl: Option<Duration>,
    /// Resource caps.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How endpoints declared by DNS name are resolved (see [`crate::egress`]).
    #[serde(default)]
    pub dns: DnsConfig,
    /// Transparent mode (the namespace's traffic is captured by `weft-proxy init`): this
    /// instance's address and app ports, announced to the control plane. Absent = explicit
    /// mode (the app calls the sidecar's own ports).
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
    /// Pooled mTLS tunnels between sidecars for TCP (see [`crate::tunnel`]); on by default,
    /// `tunnel: {enabled: false}` or `WEFT_TUNNEL=off` switches it off.
    #[serde(default)]
    pub tunnel: crate::tunnel::TunnelConfig,
}

/// `transparent:` of the bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// This instance's own IP (the pod / namespace address): callers reach its app ports there.
    pub instance_ip: IpAddr,
    /// The ports the app serves on it (at most [`MAX_APP_PORTS`]).
    #[serde(default)]
    pub app_ports: Vec<u16>,
    /// The mesh DNS server (`crate::dns`): on by default in transparent mode.
    #[serde(default)]
    pub dns: crate::dns::config::MeshDnsConfig,
}

/// Most `transparent.app_ports`.
pub const MAX_APP_PORTS: usize = 64;

impl TransparentConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.instance_ip.is_unspecified() || self.instance_ip.is_multicast() {
            return Err((
                "transparent.instance_ip",
                format!("{} is not an address callers can reach", self.instance_ip),
            ));
        }
        if self.app_ports.len() > MAX_APP_PORTS {
            return Err((
                "transparent.app_ports",
                format!("at most {MAX_APP_PORTS} ports"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.app_ports {
            if *p == 0 || !seen.insert(*p) {
                return Err((
                    "transparent.app_ports",
                    format!("{p}: ports must be 1..=65535 and distinct"),
                ));
            }
        }
        self.dns.validate()
    }
}

/// `dns:` of the bootstrap: the resolver of services' endpoints declared by DNS name
/// (`endpoints: [{host, port}]`). Absent = the system's configuration (`/etc/resolv.conf`,
/// `/etc/hosts`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers to ask instead of `/etc/resolv.conf`'s: `ip` (port 53) or `ip:port`
    /// (`[v6]:port`), asked over UDP with TCP for truncated answers. Empty = the system's.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// How long one resolution of a name may take, every name server and retry included
    /// (default 5s); a resolution that takes longer fails (the last good addresses stay).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Which addresses a name resolves to.
    #[serde(default)]
    pub ip_family: IpFamily,
}

/// Which address records the resolver asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpFamily {
    /// A records; AAAA only when there are none (the default: IPv4 reachability is the common
    /// case, and a dual-stack name then never yields unreachable IPv6 endpoints).
    #[default]
    V4Preferred,
    /// AAAA records; A only when there are none.
    V6Preferred,
    /// A records only.
    V4Only,
    /// AAAA records only.
    V6Only,
    /// Both, every address an endpoint.
    Both,
}

/// Longest `dns.timeout` accepted: a query slower than this is better counted as failed.
pub const MAX_DNS_TIMEOUT: Duration = Duration::from_secs(30);

/// Most `dns.nameservers`.
pub const MAX_NAMESERVERS: usize = 8;

impl DnsConfig {
    /// The name servers as socket addresses (port 53 when not given). `Err` names the entry.
    pub fn nameserver_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.nameservers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| format!("[{i}]: {s:?} is not an ip or ip:port"))
            })
            .collect()
    }

    /// Checks the values serde cannot: (field, reason).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let addrs = self
            .nameserver_addrs()
            .map_err(|e| ("dns.nameservers", e))?;
        if addrs.len() > MAX_NAMESERVERS {
            return Err((
                "dns.nameservers",
                format!("at most {MAX_NAMESERVERS} name servers"),
            ));
        }
        if let Some(a) = addrs
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified())
        {
            return Err((
                "dns.nameservers",
                format!("{a}: needs a reachable ip and a port other than 0"),
            ));
        }
        match self.timeout {
            Some(t) if t.is_zero() || t > MAX_DNS_TIMEOUT => Err((
                "dns.timeout",
                format!("{t:?} is outside 1ms..={MAX_DNS_TIMEOUT:?}"),
            )),
            _ => Ok(()),
        }
    }
}

/// `limits:` of the bootstrap.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most connections one listener keeps open; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections_per_listener: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_listener: default_max_connections(),
        }
    }
}

fn default_max_connections() -> usize {
    crate::conn_limit::DEFAULT_MAX_CONNECTIONS_PER_LISTENER
}

/// Environment variable overriding the bootstrap's `worker_threads`.
pub const WORKER_THREADS_ENV: &str = "WEFT_WORKER_THREADS";

/// Parses a worker-thread count (the bootstrap field or [`WORKER_THREADS_ENV`]): a positive
/// integer.
pub fn parse_worker_threads(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{value:?} is not a positive integer")),
    }
}

/// `node:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The local service this sidecar fronts (required).
    pub service: String,
    /// Namespace of `service`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Unique proxy id; defaults to `<service>-<hostname>-<pid>`.
    #[serde(default)]
    pub id: Option<String>,
    /// Free-form labels sent to the control plane.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `inbound:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Announced as this instance's endpoint.
    #[serde(default = "default_inbound")]
    pub address: SocketAddr,
    /// The local service.
    #[serde(default = "default_app")]
    pub app: SocketAddr,
}

/// `outbound:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// The outbound HTTP listener the local app calls.
    #[serde(default = "default_outbound")]
    pub address: SocketAddr,
    /// IP that outbound TCP service ports are bound on.
    #[serde(default = "default_tcp_bind_ip")]
    pub tcp_bind_ip: IpAddr,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            address: default_inbound(),
            app: default_app(),
        }
    }
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            address: default_outbound(),
            tcp_bind_ip: default_tcp_bind_ip(),
        }
    }
}

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn default_admin() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 15000)
}
fn default_control_plane() -> Vec<String> {
    vec!["http://127.0.0.1:15010".to_owned()]
}

/// Most `control_plane` URLs.
pub const MAX_CONTROL_PLANES: usize = 16;

/// `control_plane:` as one URL or a list of URLs.
fn control_plane_urls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct UrlOrList;
    impl<'de> serde::de::Visitor<'de> for UrlOrList {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a control-plane URL or a list of them")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                if urls.len() == MAX_CONTROL_PLANES {
                    return Err(serde::de::Error::custom(format!(
                        "at most {MAX_CONTROL_PLANES} control-plane URLs"
                    )));
                }
                urls.push(url);
            }
            Ok(urls)
        }
    }
    d.deserialize_any(UrlOrList)
}

/// Checks `control_plane`: at least one URL, each `http(s)://host[:port]`, no duplicates, one
/// scheme for all.
fn validate_control_planes(urls: &[String]) -> Result<(), String> {
    let parsed = urls
        .iter()
        .enumerate()
        .map(|(i, u)| {
            crate::discovery::targets::ControlPlaneUrl::parse(u).map_err(|e| {
                if urls.len() == 1 {
                    e
                } else {
                    format!("entry {i}: {e}")
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.is_empty() {
        return Err("must name at least one control-plane URL".into());
    }
    for (i, u) in parsed.iter().enumerate() {
        if parsed[..i].iter().any(|p| p.url == u.url) {
            return Err(format!("entry {i}: {:?} is listed twice", u.url));
        }
    }
    if parsed.iter().any(|u| u.is_https() != parsed[0].is_https()) {
        return Err(
            "mixes http:// and https:// URLs: every replica of one mesh is reached the same way"
                .into(),
        );
    }
    Ok(())
}
fn default_inbound() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 15006)
}
fn default_outbound() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 15001)
}
fn default_app() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 8080)
}
fn default_tcp_bind_ip() -> IpAddr {
    LOCALHOST
}
fn default_namespace() -> String {
    "default".to_owned()
}
fn default_drain() -> Duration {
    Duration::from_secs(5)
}
/// One worker per CPU this process may run on (respects the affinity mask, e.g. `taskset`).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

impl Bootstrap {
    /// Reads and validates a bootstrap file.
    pub fn load(path: &Path) -> Result<Self, BootstrapError> {
        let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut b = Self::parse(&text, &path.display().to_string())?;
        let tunnel_env = std::env::var(crate::tunnel::ENV).ok();
        b.tunnel
            .apply_env(tunnel_env.as_deref())
            .map_err(|reason| BootstrapError::Invalid {
                path: crate::tunnel::ENV.to_owned(),
                field: "tunnel.enabled",
                reason,
            })?;
        if let Ok(env) = std::env::var(WORKER_THREADS_ENV) {
            b.worker_threads =
                Some(
                    parse_worker_threads(&env).map_err(|reason| BootstrapError::Invalid {
                        path: WORKER_THREADS_ENV.to_owned(),
                        field: "worker_threads",
                        reason,
                    })?,
                );
        }
        Ok(b)
    }

    /// Data-path worker threads: `worker_threads` (or its env override), else the number of
    /// CPUs this process may run on.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(default_worker_threads)
    }

    /// Parses and validates bootstrap YAML; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, BootstrapError> {
        let b: Bootstrap = serde_yaml::from_str(text).map_err(|source| BootstrapError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        let invalid = |field, reason: String| BootstrapError::Invalid {
            path: origin.to_owned(),
            field,
            reason,
        };
        if b.node.service.is_empty() {
            return Err(invalid("node.service", "must not be empty".into()));
        }
        if b.node.id.as_deref() == Some("") {
            return Err(invalid(
                "node.id",
                "must not be empty (omit it for the default)".into(),
            ));
        }
        if b.limits.max_connections_per_listener == 0 {
            return Err(invalid(
                "limits.max_connections_per_listener",
                "must be a positive integer".into(),
            ));
        }
        if b.worker_threads == Some(0) {
            return Err(invalid(
                "worker_threads",
                "must be at least 1 (omit it for one per CPU)".into(),
            ));
        }
        if let Err((field, reason)) = b.observability.validate() {
            return Err(invalid(field, reason));
        }
        if let Err((field, reason)) = b.dns.validate() {
            return Err(invalid(field, reason));
        }
        if let Some(Err((field, reason))) = b.transparent.as_ref().map(TransparentConfig::validate)
        {
            return Err(invalid(field, reason));
        }
        if let Err(reason) = b.tunnel.validate() {
            return Err(invalid("tunnel", reason));
        }
        if let Err(reason) = validate_control_planes(&b.control_plane) {
            return Err(invalid("control_plane", reason));
        }
        if b.control_plane.iter().any(|u| u.starts_with("https://")) && b.control_plane_ca.is_none()
        {
            return Err(invalid(
                "control_plane_ca",
                "required with an https:// control_plane (the control plane's roots.pem)".into(),
            ));
        }
        if b.join_token.is_some() && b.join_token_file.is_some() {
            return Err(invalid(
                "join_token",
                "set join_token or join_token_file, not both".into(),
            ));
        }
        if b.join_token.as_deref() == Some("") {
            return Err(invalid(
                "join_token",
                "must not be empty (omit it to run without identity)".into(),
            ));
        }
        Ok(b)
    }

    /// The node id: configured, or `<service>-<hostname>-<pid>`.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node.id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{}-{}-{}", self.node.service, host, std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "
node:
  service: web
  namespace: prod
  id: web-1
  labels: {version: v1}
admin: 127.0.0.2:15000
control_plane: http://127.0.0.1:15010
inbound:
  address: 127.0.0.2:15006
  app: 127.0.0.2:8080
outbound:
  address: 127.0.0.2:15001
  tcp_bind_ip: 127.0.0.2
drain_timeout: 2s
worker_threads: 3
";

    #[test]
    fn parses_the_documented_example() {
        let b = Bootstrap::parse(FULL, "b.yaml").unwrap();
        assert_eq!(b.node.service, "web");
        assert_eq!(b.node.namespace, "prod");
        assert_eq!(b.node_id(), "web-1");
        assert_eq!(b.node.labels["version"], "v1");
        assert_eq!(b.admin.to_string(), "127.0.0.2:15000");
        assert_eq!(b.inbound.app.to_string(), "127.0.0.2:8080");
        assert_eq!(b.outbound.tcp_bind_ip.to_string(), "127.0.0.2");
        assert_eq!(b.drain_timeout, Duration::from_secs(2));
        assert_eq!(b.worker_threads(), 3);
    }

    #[test]
    fn worker_threads_default_and_validation() {
        let b = Bootstrap::parse("node: {service: web}", "b.yaml").unwrap();
        assert_eq!(b.worker_threads, None);
        assert_eq!(b.worker_threads(), default_worker_threads());
        assert!(b.worker_threads() >= 1);
        let e = Bootstrap::parse("node: {service: web}\nworker_threads: 0", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("worker_threads"), "{e}");
        let e =
            Bootstrap::parse("node: {service: web}\nworker_threads: many", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("worker_threads"), "{e}");
        assert_eq!(parse_worker_threads(" 2 "), Ok(2));
        assert!(parse_worker_threads("0").is_err());
        assert!(parse_worker_threads("x").is_err());
    }

    #[test]
    fn applies_defaults() {
        let b = Bootstrap::parse("node: {service: web}", "b.yaml").unwrap();
        assert_eq!(b.node.namespace, "default");
        assert_eq!(b.admin.to_string(), "127.0.0.1:15000");
        assert_eq!(b.control_plane, ["http://127.0.0.1:15010"]);
        assert_eq!(b.inbound.address.to_string(), "127.0.0.1:15006");
        assert_eq!(b.outbound.address.to_string(), "127.0.0.1:15001");
        assert_eq!(b.drain_timeout, Duration::from_secs(5));
        assert!(b.node_id().starts_with("web-"));
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = Bootstrap::parse("node: {service: web, servce: x}", "b.yaml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("servce") && msg.contains("node"), "{msg}");
        let e = Bootstrap::parse("node: {service: web}\nadmn: 1.2.3.4:5", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("admn"), "{e}");
    }

    #[test]
    fn security_fields() {
        let b = Bootstrap::parse(
            "node: {service: web}\ncontrol_plane: https://127.0.0.1:15010\n\
             control_plane_ca: /ca/roots.pem\njoin_token: abc\ncert_ttl: 10m",
            "b.yaml",
        )
        .unwrap();
        assert_eq!(
            b.control_plane_ca.as_deref(),
            Some(Path::new("/ca/roots.pem"))
        );
        assert_eq!(b.join_token.as_deref(), Some("abc"));
        assert_eq!(b.cert_ttl, Some(Duration::from_secs(600)));
        let e = Bootstrap::parse("node: {service: web}\ncontrol_plane: https://h:1", "b.yaml")
            .unwrap_err();
        assert!(e.to_string().contains("control_plane_ca"), "{e}");
        let e = Bootstrap::parse(
            "node: {service: web}\njoin_token: a\njoin_token_file: /t",
            "b.yaml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("join_token"), "{e}");
        let b = Bootstrap::parse("node: {service: web}\njoin_token_file: /t", "b.yaml").unwrap();
        assert_eq!(b.join_token_file.as_deref(), Some(Path::new("/t")));
    }

    #[test]
    fn dns_section() {
        let b = Bootstrap::parse("node: {service: web}", "b.yaml").unwrap();
        assert_eq!(b.dns, DnsConfig::default());
        let b = Bootstrap::parse(
            "node: {service: web}\ndns:\n  nameservers: [\"127.0.0.1:5353\", 10.0.0.2, \"[::1]:53\"]\n  timeout: 2s\n  ip_family: both",
            "b.yaml",
        )
        .unwrap();
        assert_eq!(
            b.dns.nameserver_addrs().unwrap(),
            [
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(b.dns.timeout, Some(Duration::from_secs(2)));
        assert_eq!(b.dns.ip_family, IpFamily::Both);
        for (yaml, field) in [
            ("dns: {nameservers: [localhost]}", "dns.nameservers"),
            ("dns: {nameservers: [\"127.0.0.1:0\"]}", "dns.nameservers"),
            ("dns: {nameservers: [0.0.0.0]}", "dns.nameservers"),
            ("dns: {timeout: 0s}", "dns.timeout"),
            ("dns: {timeout: 1h}", "dns.timeout"),
            ("dns: {ip_family: v5}", "ip_family"),
            ("dns: {servers: [127.0.0.1]}", "servers"),
        ] {
            let e =
                Bootstrap::parse(&format!("node: {{service: web}}\n{yaml}"), "b.yaml").unwrap_err();
            assert!(e.to_string().contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn missing_service_is_named() {
        let e = Bootstrap::parse("node: {namespace: x}", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("service"), "{e}");
        let e = Bootstrap::parse("admin: 127.0.0.1:1", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("node"), "{e}");
    }

    #[test]
    fn control_plane_takes_one_url_or_a_list() {
        let b =
            Bootstrap::parse("node: {service: web}\ncontrol_plane: http://a:1", "b.yaml").unwrap();
        assert_eq!(b.control_plane, ["http://a:1"]);
        let b = Bootstrap::parse(
            "node: {service: web}\ncontrol_plane: [\"https://cp-0.weft:15010\", \"https://10.0.0.2:15010\"]\ncontrol_plane_ca: /ca.pem",
            "b.yaml",
        )
        .unwrap();
        assert_eq!(
            b.control_plane,
            ["https://cp-0.weft:15010", "https://10.0.0.2:15010"]
        );
        let b = Bootstrap::parse(
            "node: {service: web}\ncontrol_plane:\n  - http://a:1\n  - http://b:2\n",
            "b.yaml",
        )
        .unwrap();
        assert_eq!(b.control_plane, ["http://a:1", "http://b:2"]);
        let many: Vec<String> = (0..=MAX_CONTROL_PLANES)
            .map(|i| format!("http://cp-{i}:1"))
            .collect();
        for (yaml, needle) in [
            ("control_plane: []", "at least one"),
            ("control_plane: [http://a:1, 'x y']", "entry 1: \"x y\""),
            ("control_plane: [http://a:1, http://a:1]", "listed twice"),
            ("control_plane: [http://a:1, ftp://b:2]", "entry 1"),
            (
                "control_plane: [http://a:1, https://b:2]\ncontrol_plane_ca: /ca.pem",
                "mixes http:// and https://",
            ),
            (
                "control_plane: [https://a:1, https://b:2]",
                "control_plane_ca",
            ),
            (
                "control_plane: {url: http://a:1}",
                "a control-plane URL or a list",
            ),
            (
                &format!("control_plane: [{}]", many.join(", ")),
                "at most 16 control-plane URLs",
            ),
        ] {
            let e = Bootstrap::parse(&format!("node: {{service: web}}\n{yaml}"), "b.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("control_plane") && e.contains(needle),
                "{yaml}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = Bootstrap::parse("node: {service: web}\nadmin: nope", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("admin"), "{e}");
        let e =
            Bootstrap::parse("node: {service: web}\ndrain_timeout: soon", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("drain_timeout"), "{e}");
        let e =
            Bootstrap::parse("node: {service: web}\ncontrol_plane: 'x y'", "b.yaml").unwrap_err();
        assert!(e.to_string().contains("control_plane"), "{e}");
        let e = Bootstrap::parse("node: {service: web}\ninbound: {app: 1.2.3.4}", "b.yaml")
            .unwrap_err();
        assert!(e.to_string().contains("inbound.app"), "{e}");
    }
}
