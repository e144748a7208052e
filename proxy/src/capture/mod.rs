//! Transparent capture: the network namespace's packet-redirection rules that send the app's
//! traffic through its sidecar without the app knowing (`weft-proxy init`).
//!
//! - [`rules`]: pure functions from a [`CaptureConfig`] to the `iptables-restore` input that
//!   installs, replaces or removes Weft's chains (IPv4 and IPv6), tested without root.
//! - [`iptables`]: the one module that runs `iptables-save` / `iptables-restore` (nf_tables
//!   backend by default) and turns their failures into messages a user can act on.
//! - [`init`]: the `weft-proxy init` command line.
//!
//! What the rules do (ARCHITECTURE.md "Transparent mode" has the table): every outbound TCP
//! connection of the namespace is redirected to the outbound port, every inbound one to the
//! inbound port, DNS (UDP and TCP port 53) to the mesh DNS port; the proxy's own traffic (by
//! uid / gid), loopback, the proxy's own inbound and admin ports and the configured ports and
//! CIDRs are left alone. The proxy finds where a redirected connection was going with
//! `SO_ORIGINAL_DST` ([`crate::detect::original_destination`]).
//!
//! Nothing here is imported by the data path: the rules are installed once, before the app
//! starts (an init container, or the demo's namespace set-up), by a process with
//! CAP_NET_ADMIN; the proxy itself needs no privilege.

pub mod init;
pub mod iptables;
pub mod rules;

use std::net::IpAddr;

/// Default port the captured outbound connections are redirected to (the outbound listener).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default port the captured inbound connections are redirected to (the inbound listener).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default port of the mesh DNS server (UDP and TCP).
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Default admin port (never captured inbound).
pub const DEFAULT_ADMIN_PORT: u16 = 15000;

/// An IP network `addr/prefix`, as given to `--exclude-*-cidrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Everything the capture rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where captured outbound TCP goes (the proxy's outbound listener port).
    pub outbound_port: u16,
    /// Where captured inbound TCP goes (the proxy's inbound listener port).
    pub inbound_port: u16,
    /// The proxy's admin port: never captured inbound.
    pub admin_port: u16,
    /// The mesh DNS port; `None` = DNS is not redirected.
    pub dns_port: Option<u16>,
    /// Traffic of processes running with these uids is the proxy's own: never captured.
    pub proxy_uids: Vec<u32>,
    /// Likewise for these (primary) gids.
    pub proxy_gids: Vec<u32>,
    /// Inbound destination ports left alone (e.g. 22), besides the inbound and admin ports.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound sources left alone.
    pub exclude_inbound_cidrs: Vec<Cidr>,
    /// Outbound destinations left alone.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Also install the IPv6 rules (ip6tables).
    pub ipv6: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            dns_port: Some(DEFAULT_DNS_PORT),
            proxy_uids: Vec::new(),
            proxy_gids: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_cidrs: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            ipv6: true,
        }
    }
}

impl CaptureConfig {
    /// Checks what the rules need: a way to recognise the proxy's own traffic (else it would be
    /// redirected back to itself in a loop), and distinct non-zero ports.
    pub fn validate(&self) -> Result<(), String> {
        if self.proxy_uids.is_empty() && self.proxy_gids.is_empty() {
            return Err(
                "give --proxy-uid or --proxy-gid (the user or group the proxy runs as): \
                 without them the proxy's own connections would be captured again, in a loop"
                    .into(),
            );
        }
        let mut ports = vec![
            ("--outbound-port", self.outbound_port),
            ("--inbound-port", self.inbound_port),
            ("--admin-port", self.admin_port),
        ];
        if let Some(p) = self.dns_port {
            ports.push(("--dns-port", p));
        }
        for (i, (name, p)) in ports.iter().enumerate() {
            if *p == 0 {
                return Err(format!("{name} must not be 0"));
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, q)| q == p) {
                return Err(format!("{name} {p} is also {other}"));
            }
        }
        Ok(())
    }
}
