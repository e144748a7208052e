//! Hosts in Linux network namespaces for transparent-mode tests (ztunnel's namespaced tests are
//! the model): one LAN, a bridge in a namespace of its own, each host a namespace with a veth
//! on it, and a veth from the test's own (root) namespace so the test reaches every host and the
//! hosts reach the control plane the test runs. Everything is removed when the [`Network`]
//! drops, also when the test panics.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range, never routed): the LAN is
//! `198.18.<n>.0/24`, the root namespace `.1`, hosts `.2`, `.3`, ... in the order given. Hosts
//! also get an IPv6 address on the LAN, `fd77:6566:7400:<n>::<x>/64` (a ULA, `nodad`: usable at
//! once, no duplicate-address-detection delay); the root namespace has none.
//! Creating needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); [`Network::create`] returns `Err` with
//! the reason when `ip netns add` is refused, so a test can skip saying why.
//!
//! [`Network::set_resolv_conf`] gives a host its own `/etc/resolv.conf` (`ip netns exec`
//! bind-mounts `/etc/netns/<ns>/resolv.conf` over it), removed with the network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Counter making names unique within this process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A LAN of namespaced hosts.
#[derive(Debug)]
pub struct Network {
    /// Namespace name prefix, unique per network.
    prefix: String,
    /// The third octet of the LAN.
    subnet: u8,
    hosts: Vec<String>,
    /// Namespaces created so far (removed on drop).
    created: Vec<String>,
    /// The veth end in the root namespace.
    root_link: Option<String>,
    /// `/etc/netns/<ns>` directories written (removed on drop).
    etc_dirs: Vec<PathBuf>,
}

/// Runs `ip args...`; `Err` carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Network {
    /// Creates the LAN and one namespace per name of `hosts`.
    pub fn create(hosts: &[&str]) -> Result<Network, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("weft{}x{n}", pid % 100_000);
        // A /24 no route of this machine covers yet (bounded: 250 candidates).
        let routes = Command::new("ip")
            .args(["-4", "route", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let start = (pid.wrapping_add(n * 37) % 250) as u8;
        let subnet = (0..250u8)
            .map(|i| start.wrapping_add(i) % 250 + 1)
            .find(|s| !routes.contains(&format!("198.18.{s}.")))
            .ok_or("no free 198.18.x.0/24 for the test LAN")?;
        let mut net = Network {
            prefix,
            subnet,
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            created: Vec::new(),
            root_link: None,
            etc_dirs: Vec::new(),
        };
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<(), String> {
        let hub = format!("{}-hub", self.prefix);
        ip(&["netns", "add", &hub])?;
        self.created.push(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        let prefix_len = "/24";
        for (i, host) in self.hosts.clone().iter().enumerate() {
            let ns = self.ns(host);
            ip(&["netns", "add", &ns])?;
            self.created.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}{prefix_len}", self.host_ip(host));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            let addr6 = format!("{}/64", self.host_ip6(host));
            ip(&[
                "-n", &ns, "-6", "addr", "add", &addr6, "dev", "eth0", "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // The root namespace's leg: a name unique on this machine (at most 15 bytes).
        let link = format!("wt{}", &self.prefix[4..]);
        let link: String = link.chars().take(15).collect();
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "up0", "netns", &hub,
        ])?;
        self.root_link = Some(link.clone());
        ip(&["-n", &hub, "link", "set", "up0", "master", "br0", "up"])?;
        let addr = format!("{}{prefix_len}", self.gateway_ip());
        ip(&["addr", "add", &addr, "dev", &link])?;
        ip(&["link", "set", &link, "up"])?;
        Ok(())
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The address `.x` of the LAN.
    pub fn lan_ip(&self, x: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.subnet, x))
    }

    /// The IPv6 address `::x` of the LAN (`fd77:6566:7400:<n>::x`).
    pub fn lan_ip6(&self, x: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd77,
            0x6566,
            0x7400,
            u16::from(self.subnet),
            0,
            0,
            0,
            x,
        ))
    }

    /// `host`'s IPv6 address (`::2`, `::3`, ... like its IPv4 one).
    pub fn host_ip6(&self, host: &str) -> IpAddr {
        let IpAddr::V4(v4) = self.host_ip(host) else {
            unreachable!("host addresses are IPv4")
        };
        self.lan_ip6(u16::from(v4.octets()[3]))
    }

    /// Gives `host` its own `/etc/resolv.conf` with `content` (programs started with
    /// [`Network::command`] / [`Network::run`] see it); removed when the network drops.
    pub fn set_resolv_conf(&mut self, host: &str, content: &str) -> Result<(), String> {
        let dir = PathBuf::from("/etc/netns").join(self.ns(host));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if !self.etc_dirs.contains(&dir) {
            self.etc_dirs.push(dir.clone());
        }
        let file = dir.join("resolv.conf");
        std::fs::write(&file, content).map_err(|e| format!("writing {}: {e}", file.display()))
    }

    /// The root namespace's address on the LAN (where the test's own servers listen).
    pub fn gateway_ip(&self) -> IpAddr {
        self.lan_ip(1)
    }

    /// `host`'s address.
    pub fn host_ip(&self, host: &str) -> IpAddr {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .unwrap_or_else(|| panic!("no host {host:?} in this network"));
        self.lan_ip(u8::try_from(i + 2).unwrap_or(u8::MAX))
    }

    /// `program` run inside `host`'s namespace (`ip netns exec`, which execs it: the child's
    /// PID is the program's).
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(self.ns(host)).arg(program);
        cmd
    }

    /// Runs `program args` in `host` to completion (the program must bound its own time).
    pub fn run(&self, host: &str, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
        let mut cmd = self.command(host, program);
        cmd.args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and with them their peers.
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns cleanup: {e}");
            }
        }
        if let Some(link) = &self.root_link {
            // Normally gone with the hub's end; only an error if it is still there.
            let _ = ip(&["link", "del", link]);
        }
        for dir in &self.etc_dirs {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                eprintln!("netns cleanup: removing {}: {e}", dir.display());
            }
        }
    }
}
