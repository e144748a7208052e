//! Loopback addresses and free ports.
//!
//! Each proxy in a test gets its own loopback IP, the way pods each get their own IP, so several
//! proxies on one host can use the same ports (e.g. a `tcp` service's port on every caller).
//! The second octet is derived from the test process's PID so that test binaries running at the
//! same time (other developers' runs) are unlikely to pick the same IPs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// A loopback IP (`127.P.x.y`) not handed out before by this process. Linux routes all of
/// 127.0.0.0/8 to `lo`, so any of them can be bound without setup.
pub fn next_loopback_ip() -> IpAddr {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    // 2..=251 for the last octet: skip .0, .1 and .255 (no special meaning on lo, but less surprising).
    let last = (n % 250 + 2) as u8;
    let third = ((n / 250) % 256) as u8;
    // 1..=250: never 127.0.x.y, which other tools on the machine tend to use.
    let second = (std::process::id() % 250 + 1) as u8;
    IpAddr::V4(Ipv4Addr::new(127, second, third, last))
}

/// `n` distinct loopback IPs (see [`next_loopback_ip`]).
pub fn loopback_ips(n: usize) -> Vec<IpAddr> {
    (0..n).map(|_| next_loopback_ip()).collect()
}

/// A TCP port that was free on `ip` a moment ago (bound to port 0, then released).
pub fn free_port(ip: IpAddr) -> u16 {
    let listener = TcpListener::bind((ip, 0))
        .unwrap_or_else(|e| panic!("cannot bind {ip}:0 to find a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address for a socket bound on {ip}: {e}"))
        .port()
}

/// `n` distinct addresses on `ip` whose ports were free a moment ago: the sockets are held until
/// all are chosen, so two of them can never be the same port (which separate [`free_addr`] calls
/// may return).
pub fn free_addrs(ip: IpAddr, n: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind((ip, 0))
                .unwrap_or_else(|e| panic!("cannot bind {ip}:0 to find a free port: {e}"))
        })
        .collect();
    held.iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("no local address for a socket bound on {ip}: {e}"))
        })
        .collect()
}

/// `ip` with a port that was free a moment ago.
pub fn free_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, free_port(ip))
}
