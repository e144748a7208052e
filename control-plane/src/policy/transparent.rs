//! Transparent mode's policy knobs: service virtual IPs (`services[].vip`, or allocated from
//! `mesh.vip_range`) and how sidecars detect the protocol of captured connections
//! (`mesh.protocol_detection`).
//!
//! VIP allocation is a pure function of the policy set ([`allocate_vips`]), computed once when a
//! set is built: declared VIPs first, then every other service in (namespace, name) order takes
//! the first free address at or after a hash of its name, so adding or removing a service leaves
//! the others' VIPs where they were (unless they collided, which a probe resolves the same way
//! every time).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Service, ServiceKey};
use crate::hash::StableHasher;

/// Default wait for a captured connection's first bytes.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Longest `mesh.protocol_detection.timeout` accepted.
pub const MAX_DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most addresses a `vip_range` is used for (a /16 of IPv4; larger ranges use their first part).
pub const MAX_VIP_RANGE: u128 = 1 << 16;

/// Ports whose server speaks first (the client waits for a greeting), so a sidecar waiting for
/// the client's first bytes would stall every connection: FTP 21, SMTP 25, POP3 110, IMAP 143,
/// submission 587, MySQL 3306. (PostgreSQL's client speaks first: 5432 is not here.)
pub const DEFAULT_SERVER_FIRST_PORTS: [u16; 6] = [21, 25, 110, 143, 587, 3306];

/// `mesh.protocol_detection`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolDetection {
    /// How long a sidecar waits for a captured connection's first bytes before treating it as
    /// opaque TCP (default 200ms).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Destination ports whose server speaks first: never sniffed (replaces the default list).
    #[serde(default = "default_server_first")]
    pub server_first_ports: Vec<u16>,
    /// More ports never sniffed: opaque protocols (their connections are TCP at once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opaque_ports: Vec<u16>,
}

fn default_timeout() -> Duration {
    DEFAULT_DETECT_TIMEOUT
}

fn default_server_first() -> Vec<u16> {
    DEFAULT_SERVER_FIRST_PORTS.to_vec()
}

impl Default for ProtocolDetection {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            server_first_ports: default_server_first(),
            opaque_ports: Vec::new(),
        }
    }
}

impl ProtocolDetection {
    /// Every port never sniffed, sorted and deduplicated.
    pub fn skip_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .server_first_ports
            .iter()
            .chain(&self.opaque_ports)
            .copied()
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// An IP network, as `mesh.vip_range` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    /// The network address (host bits cleared).
    pub network: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl IpRange {
    /// Parses `addr/prefix`; the range must hold at least 4 addresses.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (addr/prefix)"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
        let bits: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= bits.saturating_sub(2))
            .ok_or_else(|| format!("{s:?}: prefix must be 0..={}", bits - 2))?;
        let host_bits = u32::from(bits - prefix);
        let network = match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
                IpAddr::from(std::net::Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                IpAddr::from(std::net::Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Ok(Self { network, prefix })
    }

    /// How many addresses are handed out: every host address but the network's first and last
    /// (IPv4 network and broadcast; kept the same for IPv6), at most [`MAX_VIP_RANGE`].
    pub fn usable(&self) -> u128 {
        let bits: u32 = if self.network.is_ipv4() { 32 } else { 128 };
        let size = 1u128
            .checked_shl(bits - u32::from(self.prefix))
            .unwrap_or(u128::MAX);
        size.saturating_sub(2).min(MAX_VIP_RANGE)
    }

    /// The `i`-th usable address (`i < usable()`).
    fn nth(&self, i: u128) -> IpAddr {
        match self.network {
            IpAddr::V4(v4) => {
                let off = u32::try_from(i + 1).unwrap_or(0);
                IpAddr::from(std::net::Ipv4Addr::from(u32::from(v4).wrapping_add(off)))
            }
            IpAddr::V6(v6) => {
                IpAddr::from(std::net::Ipv6Addr::from(u128::from(v6).wrapping_add(i + 1)))
            }
        }
    }

    /// Whether `ip` is one of the usable addresses.
    pub fn holds(&self, ip: IpAddr) -> bool {
        let off = match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(u32::from(a).wrapping_sub(u32::from(n))),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a).wrapping_sub(u128::from(n)),
            _ => return false,
        };
        (1..=self.usable()).contains(&off)
    }
}

/// A declared `services[].vip`, parsed; `Err` says why it cannot be one.
pub fn parse_vip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address"))?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err(format!(
            "{ip} cannot be a virtual IP (unspecified, loopback or multicast)"
        ));
    }
    Ok(ip)
}

/// The VIP of every service that has one: its declared `vip`, else (with a `range`) an address
/// of the range. `Err` names how many services found no free address.
pub fn allocate_vips(
    services: &[Service],
    range: Option<&IpRange>,
) -> Result<BTreeMap<ServiceKey, IpAddr>, String> {
    let mut out = BTreeMap::new();
    let mut taken = HashSet::new();
    for s in services {
        if let Some(ip) = s.vip.as_deref().and_then(|v| parse_vip(v).ok()) {
            taken.insert(ip);
            out.insert(ServiceKey::new(&s.name, &s.namespace), ip);
        }
    }
    let Some(range) = range else {
        return Ok(out);
    };
    let usable = range.usable();
    let mut rest: Vec<ServiceKey> = services
        .iter()
        .filter(|s| s.vip.is_none())
        .map(|s| ServiceKey::new(&s.name, &s.namespace))
        .collect();
    rest.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    rest.dedup();
    let mut unplaced = 0usize;
    for key in rest {
        let mut h = StableHasher::new();
        h.write_field(key.namespace.as_bytes());
        h.write_field(key.name.as_bytes());
        let start = u128::from(u64::from_str_radix(&h.finish_hex(), 16).unwrap_or(0)) % usable;
        // Bounded: at most `usable` probes, each a set lookup.
        let free = (0..usable)
            .map(|i| range.nth((start + i) % usable))
            .find(|ip| !taken.contains(ip));
        match free {
            Some(ip) => {
                taken.insert(ip);
                out.insert(key, ip);
            }
            None => unplaced += 1,
        }
    }
    if unplaced > 0 {
        return Err(format!(
            "{unplaced} services got no virtual IP: the range has {usable} usable addresses"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, vip: Option<&str>) -> Service {
        let yaml = match vip {
            Some(v) => format!("name: {name}\nvip: {v}\n"),
            None => format!("name: {name}\n"),
        };
        serde_yaml::from_str(&yaml).unwrap()
    }

    #[test]
    fn ranges_parse_and_bound() {
        let r = IpRange::parse("240.240.1.7/24").unwrap();
        assert_eq!(r.network, "240.240.1.0".parse::<IpAddr>().unwrap());
        assert_eq!(r.usable(), 254);
        assert!(r.holds("240.240.1.1".parse().unwrap()));
        assert!(!r.holds("240.240.1.0".parse().unwrap()));
        assert!(!r.holds("240.240.1.255".parse().unwrap()));
        assert_eq!(
            IpRange::parse("10.0.0.0/8").unwrap().usable(),
            MAX_VIP_RANGE
        );
        assert!(IpRange::parse("fd00::/64")
            .unwrap()
            .holds("fd00::5".parse().unwrap()));
        for bad in ["10.0.0.0", "10.0.0.0/31", "x/8", "10.0.0.0/x", "fd00::/127"] {
            assert!(IpRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn declared_vips_win_and_allocation_is_stable() {
        let range = IpRange::parse("10.96.0.0/24").unwrap();
        let services = vec![
            svc("api", None),
            svc("db", Some("10.96.0.10")),
            svc("web", None),
        ];
        let first = allocate_vips(&services, Some(&range)).unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(
            first[&ServiceKey::new("db", "default")],
            "10.96.0.10".parse::<IpAddr>().unwrap()
        );
        assert!(first.values().all(|ip| range.holds(*ip)));
        let distinct: HashSet<_> = first.values().collect();
        assert_eq!(distinct.len(), 3);
        // A new service leaves the others' addresses alone; the order of declaration does not
        // matter.
        let mut more = vec![svc("zeta", None)];
        more.extend(services.iter().rev().cloned());
        let second = allocate_vips(&more, Some(&range)).unwrap();
        for (k, ip) in &first {
            assert_eq!(second[k], *ip, "{k:?}");
        }
        // No range: only declared ones.
        assert_eq!(allocate_vips(&services, None).unwrap().len(), 1);
    }

    #[test]
    fn a_full_range_is_an_error() {
        let range = IpRange::parse("10.96.0.0/30").unwrap();
        let services: Vec<Service> = (0..3).map(|i| svc(&format!("s{i}"), None)).collect();
        let e = allocate_vips(&services, Some(&range)).unwrap_err();
        assert!(e.contains("1 services"), "{e}");
    }

    #[test]
    fn vips_must_be_routable() {
        assert!(parse_vip("10.1.2.3").is_ok());
        for bad in ["127.0.0.1", "0.0.0.0", "224.0.0.1", "::1", "x"] {
            assert!(parse_vip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn detection_defaults_and_skip_ports() {
        let d = ProtocolDetection::default();
        assert_eq!(d.timeout, Duration::from_millis(200));
        assert!(d.skip_ports().contains(&3306) && d.skip_ports().contains(&25));
        assert!(!d.skip_ports().contains(&5432));
        let d: ProtocolDetection = serde_yaml::from_str(
            "timeout: 50ms\nserver_first_ports: [25]\nopaque_ports: [9000, 25]",
        )
        .unwrap();
        assert_eq!(d.skip_ports(), [25, 9000]);
    }
}
