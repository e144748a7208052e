//! Where the control plane is: the bootstrap's `control_plane` URLs (one, or a list of
//! replicas), each expanded to every address its host resolves to, and the order they are
//! tried in.
//!
//! A **round** resolves every URL again (so a DNS name follows replicas that move) and lists
//! its addresses in order: the URLs in bootstrap order, each URL's addresses in the order the
//! resolver gave them, duplicates dropped. The client takes the next address of the round for
//! each attempt; an attempt that fails, or a stream that ends, moves to the next one; the end of
//! the list starts a new round. So a proxy stays on the replica it reached as long as its stream
//! lives, and moves to another as soon as it breaks.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// How long resolving one URL's host may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One configured control-plane URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneUrl {
    /// As configured (`https://cp.weft:15010`).
    pub url: String,
    /// Its host, without IPv6 brackets.
    pub host: String,
    /// Its port (default 443 for `https://`, 80 for `http://`).
    pub port: u16,
}

impl ControlPlaneUrl {
    /// Parses an `http://host[:port]` or `https://host[:port]` URL; says what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = || format!("{url:?} is not an http(s)://host:port URL");
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(bad)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if port == 0 {
            return Err(format!("{url:?}: port 0"));
        }
        Ok(Self {
            url: url.to_owned(),
            host,
            port,
        })
    }

    /// Whether the URL is `https://`.
    pub fn is_https(&self) -> bool {
        self.url.starts_with("https://")
    }
}

/// One address to try: the URL it came from (its host is the TLS server name) and the socket
/// address to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The configured URL.
    pub url: String,
    /// The address dialled.
    pub addr: SocketAddr,
}

/// Resolves a host and port to addresses (the system resolver in production, a table in tests).
pub type Lookup = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (`getaddrinfo`: /etc/hosts, then DNS), every address it returns.
pub fn system_lookup() -> Lookup {
    Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
}

/// What one round resolved: the targets in order, and what could not be resolved.
#[derive(Debug, Default)]
pub struct Resolved {
    pub targets: Vec<Target>,
    /// One line per URL that gave no address, naming it.
    pub errors: Vec<String>,
}

/// Resolves every URL of `urls` with `lookup` (IP literals without it), in order, dropping
/// addresses already listed.
pub async fn resolve(urls: &[String], lookup: &Lookup) -> Resolved {
    let mut out = Resolved::default();
    for raw in urls {
        let url = match ControlPlaneUrl::parse(raw) {
            Ok(u) => u,
            Err(e) => {
                out.errors.push(format!("control_plane {e}"));
                continue;
            }
        };
        let addrs = match url.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, url.port)],
            Err(_) => {
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup(url.host.clone(), url.port))
                    .await
                {
                    Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
                    Ok(Ok(_)) => {
                        out.errors.push(format!(
                            "control_plane {}: {} has no address",
                            url.url, url.host
                        ));
                        continue;
                    }
                    Ok(Err(e)) => {
                        out.errors.push(format!(
                            "control_plane {}: resolving {}: {e}",
                            url.url, url.host
                        ));
                        continue;
                    }
                    Err(_) => {
                        out.errors.push(format!(
                            "control_plane {}: resolving {}: no answer within {RESOLVE_TIMEOUT:?}",
                            url.url, url.host
                        ));
                        continue;
                    }
                }
            }
        };
        for addr in addrs {
            if !out.targets.iter().any(|t| t.addr == addr) {
                out.targets.push(Target {
                    url: url.url.clone(),
                    addr,
                });
            }
        }
    }
    out
}

/// The addresses left to try in the current round.
#[derive(Debug, Default)]
pub struct Rotation {
    pending: VecDeque<Target>,
}

impl Rotation {
    /// The next address to try: the next one of this round, or the first of a new round
    /// (every URL resolved again). `Err` names why a new round found nothing.
    pub async fn next(&mut self, urls: &[String], lookup: &Lookup) -> Result<Target, String> {
        if let Some(t) = self.pending.pop_front() {
            return Ok(t);
        }
        let resolved = resolve(urls, lookup).await;
        for e in &resolved.errors {
            tracing::warn!("{e}");
        }
        self.pending = resolved.targets.into();
        self.pending.pop_front().ok_or_else(|| {
            if resolved.errors.is_empty() {
                "no control_plane address".to_owned()
            } else {
                resolved.errors.join("; ")
            }
        })
    }

    /// How many addresses are left in this round.
    pub fn left(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The table a test resolver answers from: host name -> its addresses.
    type Table = Arc<Mutex<Vec<(String, Vec<SocketAddr>)>>>;

    /// A resolver answering from a table that the test can change, counting lookups.
    fn table(entries: &[(&str, &[&str])]) -> (Lookup, Table, Arc<Mutex<usize>>) {
        let map: Vec<(String, Vec<SocketAddr>)> = entries
            .iter()
            .map(|(h, addrs)| {
                (
                    (*h).to_owned(),
                    addrs.iter().map(|a| a.parse().unwrap()).collect(),
                )
            })
            .collect();
        let map = Arc::new(Mutex::new(map));
        let calls = Arc::new(Mutex::new(0usize));
        let (m, c) = (Arc::clone(&map), Arc::clone(&calls));
        let lookup: Lookup = Arc::new(move |host: String, port: u16| {
            *c.lock().unwrap() += 1;
            let found = m
                .lock()
                .unwrap()
                .iter()
                .find(|(h, _)| *h == host)
                .map(|(_, a)| a.iter().map(|a| SocketAddr::new(a.ip(), port)).collect());
            Box::pin(async move {
                found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
            })
        });
        (lookup, map, calls)
    }

    #[test]
    fn parses_urls_with_default_ports() {
        let u = ControlPlaneUrl::parse("https://cp.weft:15010").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.is_https()),
            ("cp.weft", 15010, true)
        );
        assert_eq!(ControlPlaneUrl::parse("https://cp").unwrap().port, 443);
        assert_eq!(ControlPlaneUrl::parse("http://cp").unwrap().port, 80);
        let v6 = ControlPlaneUrl::parse("http://[::1]:15010").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 15010));
        for bad in [
            "x y",
            "ftp://a:1",
            "127.0.0.1:15010",
            "http://",
            "http://a:0",
        ] {
            let e = ControlPlaneUrl::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn every_address_of_every_url_in_order_without_duplicates() {
        let (lookup, _, calls) = table(&[
            ("cp.weft", &["10.0.0.1:0", "10.0.0.2:0", "10.0.0.3:0"]),
            ("cp-b", &["10.0.0.2:0"]),
        ]);
        let urls = [
            "https://cp.weft:15010".to_owned(),
            "https://127.0.0.9:15010".to_owned(),
            "https://cp-b:15010".to_owned(),
            "https://missing:15010".to_owned(),
        ];
        let r = resolve(&urls, &lookup).await;
        let got: Vec<(String, String)> = r
            .targets
            .iter()
            .map(|t| (t.url.clone(), t.addr.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "https://cp.weft:15010".to_owned(),
                    "10.0.0.1:15010".to_owned()
                ),
                (
                    "https://cp.weft:15010".to_owned(),
                    "10.0.0.2:15010".to_owned()
                ),
                (
                    "https://cp.weft:15010".to_owned(),
                    "10.0.0.3:15010".to_owned()
                ),
                (
                    "https://127.0.0.9:15010".to_owned(),
                    "127.0.0.9:15010".to_owned()
                ),
            ]
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].contains("missing"), "{:?}", r.errors);
        // IP literals are not looked up.
        assert_eq!(*calls.lock().unwrap(), 3);
    }

    #[tokio::test]
    async fn a_rotation_walks_the_round_then_resolves_again() {
        let (lookup, map, calls) = table(&[("cp.weft", &["10.0.0.1:0", "10.0.0.2:0"])]);
        let urls = [
            "http://cp.weft:1".to_owned(),
            "http://127.0.0.5:2".to_owned(),
        ];
        let mut r = Rotation::default();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(r.next(&urls, &lookup).await.unwrap().addr.to_string());
        }
        assert_eq!(seen, ["10.0.0.1:1", "10.0.0.2:1", "127.0.0.5:2"]);
        assert_eq!(*calls.lock().unwrap(), 1, "one resolution per round");
        assert_eq!(r.left(), 0);
        // The name now points elsewhere: the next round follows it.
        map.lock().unwrap()[0].1 = vec!["10.0.0.7:0".parse().unwrap()];
        assert_eq!(
            r.next(&urls, &lookup).await.unwrap().addr.to_string(),
            "10.0.0.7:1"
        );
        assert_eq!(*calls.lock().unwrap(), 2);
        assert_eq!(r.left(), 1);
    }

    #[tokio::test]
    async fn a_round_with_nothing_resolvable_says_why() {
        let (lookup, _, _) = table(&[]);
        let mut r = Rotation::default();
        let e = r
            .next(&["https://nowhere.weft:15010".to_owned()], &lookup)
            .await
            .unwrap_err();
        assert!(
            e.contains("nowhere.weft") && e.contains("no such host"),
            "{e}"
        );
    }
}
