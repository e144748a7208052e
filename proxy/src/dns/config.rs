//! `transparent.dns` of the bootstrap: the mesh DNS server's settings, and where its upstream
//! resolvers come from (the bootstrap, else `/etc/resolv.conf`, read with hickory-resolver's
//! parser).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

/// Default cluster domain: `api.<ns>.svc.cluster.local`.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Default time one forwarded query may take, every upstream and the TCP retry included.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `timeout` accepted.
pub const MAX_FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// Default most forwarded queries in flight at once; more are answered REFUSED.
pub const DEFAULT_MAX_FORWARDS: usize = 256;
/// Largest `max_concurrent_forwards` accepted.
pub const MAX_MAX_FORWARDS: usize = 16_384;
/// Most `upstreams`.
pub const MAX_UPSTREAMS: usize = 8;

/// `transparent.dns:` (every field optional; absent = these defaults, server on).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshDnsConfig {
    /// Run the mesh DNS server (default true). Off: `weft-proxy init --no-dns` must be used,
    /// or the namespace's DNS goes nowhere.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// UDP and TCP port on 127.0.0.1 and ::1, where `weft-proxy init` redirects port 53
    /// (default 15053, `init --dns-port`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// The cluster domain of `<svc>.<ns>.svc.<cluster_domain>` (default `cluster.local`).
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Resolvers other names are forwarded to: `ip` (port 53) or `ip:port`, tried in order.
    /// Empty = the `nameserver`s of `/etc/resolv.conf`.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// How long one forwarded query may take (default 5s): past it the client gets SERVFAIL.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most forwarded queries in flight at once (default 256); more are answered REFUSED.
    #[serde(default = "default_max_forwards")]
    pub max_concurrent_forwards: usize,
}

fn default_enabled() -> bool {
    true
}

fn default_port() -> u16 {
    crate::capture::DEFAULT_DNS_PORT
}

fn default_cluster_domain() -> String {
    DEFAULT_CLUSTER_DOMAIN.to_owned()
}

fn default_timeout() -> Duration {
    DEFAULT_FORWARD_TIMEOUT
}

fn default_max_forwards() -> usize {
    DEFAULT_MAX_FORWARDS
}

impl Default for MeshDnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            port: default_port(),
            cluster_domain: default_cluster_domain(),
            upstreams: Vec::new(),
            timeout: DEFAULT_FORWARD_TIMEOUT,
            max_concurrent_forwards: DEFAULT_MAX_FORWARDS,
        }
    }
}

/// Where the upstream resolvers came from (for `/config_dump` and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSource {
    /// `transparent.dns.upstreams`.
    Bootstrap,
    /// `/etc/resolv.conf`.
    ResolvConf,
    /// `/etc/resolv.conf` unreadable or without a name server: 127.0.0.1:53, as glibc does.
    Fallback,
}

impl UpstreamSource {
    /// For `/config_dump`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bootstrap => "bootstrap",
            Self::ResolvConf => "/etc/resolv.conf",
            Self::Fallback => "127.0.0.1:53 (/etc/resolv.conf unusable)",
        }
    }
}

impl MeshDnsConfig {
    /// The addresses the server listens on (UDP and TCP): where `REDIRECT` in the `nat`
    /// table's OUTPUT chain sends locally generated packets.
    pub fn listen_addrs(&self) -> [SocketAddr; 2] {
        [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.port),
        ]
    }

    /// The configured upstreams as socket addresses (port 53 when not given); `Err` names the
    /// entry.
    pub fn upstream_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.upstreams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| format!("[{i}]: {s:?} is not an ip or ip:port"))
            })
            .collect()
    }

    /// The cluster domain, lower-case, without a trailing dot.
    pub fn domain(&self) -> String {
        self.cluster_domain
            .trim_end_matches('.')
            .to_ascii_lowercase()
    }

    /// Checks what serde cannot: `(field, reason)` with the field under `transparent.dns`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.port == 0 {
            return Err(("transparent.dns.port", "must not be 0".into()));
        }
        let domain = self.domain();
        let labels_ok = !domain.is_empty()
            && domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !labels_ok || domain.len() > 200 {
            return Err((
                "transparent.dns.cluster_domain",
                format!(
                    "{:?} is not a DNS name (labels of letters, digits and '-')",
                    self.cluster_domain
                ),
            ));
        }
        let addrs = self
            .upstream_addrs()
            .map_err(|e| ("transparent.dns.upstreams", e))?;
        if addrs.len() > MAX_UPSTREAMS {
            return Err((
                "transparent.dns.upstreams",
                format!("at most {MAX_UPSTREAMS} resolvers"),
            ));
        }
        if let Some(a) = addrs
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified())
        {
            return Err((
                "transparent.dns.upstreams",
                format!("{a}: needs a reachable ip and a port other than 0"),
            ));
        }
        if let Some(a) = addrs.iter().find(|a| self.listen_addrs().contains(a)) {
            return Err((
                "transparent.dns.upstreams",
                format!("{a} is this sidecar's own DNS server: queries would loop"),
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_FORWARD_TIMEOUT {
            return Err((
                "transparent.dns.timeout",
                format!(
                    "{:?} is outside 1ms..={MAX_FORWARD_TIMEOUT:?}",
                    self.timeout
                ),
            ));
        }
        if self.max_concurrent_forwards == 0 || self.max_concurrent_forwards > MAX_MAX_FORWARDS {
            return Err((
                "transparent.dns.max_concurrent_forwards",
                format!("must be 1..={MAX_MAX_FORWARDS}"),
            ));
        }
        Ok(())
    }

    /// The upstream resolvers: the bootstrap's, else `/etc/resolv.conf`'s (its `nameserver`
    /// lines, each with the port of its UDP connection), else 127.0.0.1:53 with a warning.
    /// This server's own listen addresses are never upstreams (a query would come back here).
    pub fn resolve_upstreams(&self) -> Result<(Vec<SocketAddr>, UpstreamSource), String> {
        let configured = self.upstream_addrs()?;
        let (mut addrs, source) = if !configured.is_empty() {
            (configured, UpstreamSource::Bootstrap)
        } else {
            match hickory_resolver::system_conf::read_system_conf() {
                Ok((conf, _)) => {
                    let addrs: Vec<SocketAddr> = conf
                        .name_servers()
                        .iter()
                        .map(|ns| {
                            let port = ns
                                .connections
                                .iter()
                                .find(|c| {
                                    matches!(
                                        c.protocol,
                                        hickory_resolver::config::ProtocolConfig::Udp
                                    )
                                })
                                .map_or(53, |c| c.port);
                            SocketAddr::new(ns.ip, port)
                        })
                        .collect();
                    (addrs, UpstreamSource::ResolvConf)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mesh DNS: cannot read /etc/resolv.conf; forwarding to 127.0.0.1:53");
                    (Vec::new(), UpstreamSource::Fallback)
                }
            }
        };
        let own = self.listen_addrs();
        addrs.retain(|a| !own.contains(a));
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(*a));
        addrs.truncate(MAX_UPSTREAMS);
        if addrs.is_empty() {
            return Ok((
                vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 53))],
                UpstreamSource::Fallback,
            ));
        }
        Ok((addrs, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> MeshDnsConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_and_fields() {
        let d = parse("{}");
        assert_eq!(d, MeshDnsConfig::default());
        assert!(d.enabled);
        assert_eq!(d.port, 15053);
        assert_eq!(d.domain(), "cluster.local");
        assert_eq!(d.timeout, Duration::from_secs(5));
        assert!(d.validate().is_ok());
        let c = parse(
            "{port: 5353, cluster_domain: Mesh.Example., upstreams: ['10.0.0.1', '[fd00::1]:5300'], \
             timeout: 2s, max_concurrent_forwards: 8}",
        );
        assert_eq!(c.domain(), "mesh.example");
        assert_eq!(
            c.upstream_addrs().unwrap(),
            [
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:5300".parse().unwrap()
            ]
        );
        assert!(c.validate().is_ok());
        assert_eq!(
            c.resolve_upstreams().unwrap(),
            (c.upstream_addrs().unwrap(), UpstreamSource::Bootstrap)
        );
        assert!(serde_yaml::from_str::<MeshDnsConfig>("{bogus: 1}").is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        let field = |yaml: &str| parse(yaml).validate().unwrap_err().0;
        assert_eq!(field("{port: 0}"), "transparent.dns.port");
        assert_eq!(
            field("{cluster_domain: 'a..b'}"),
            "transparent.dns.cluster_domain"
        );
        assert_eq!(
            field("{cluster_domain: 'a_b'}"),
            "transparent.dns.cluster_domain"
        );
        assert_eq!(field("{upstreams: [nope]}"), "transparent.dns.upstreams");
        assert_eq!(
            field("{upstreams: ['0.0.0.0']}"),
            "transparent.dns.upstreams"
        );
        let e = parse("{upstreams: ['127.0.0.1:15053']}")
            .validate()
            .unwrap_err();
        assert!(e.1.contains("loop"), "{e:?}");
        assert_eq!(field("{timeout: 0s}"), "transparent.dns.timeout");
        assert_eq!(field("{timeout: 31s}"), "transparent.dns.timeout");
        assert_eq!(
            field("{max_concurrent_forwards: 0}"),
            "transparent.dns.max_concurrent_forwards"
        );
    }
}
