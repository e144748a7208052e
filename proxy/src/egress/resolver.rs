//! Name resolution for endpoints declared by DNS name: the [`Resolve`] seam the per-cluster
//! tasks use, and [`DnsResolver`], its implementation on `hickory-resolver` configured from the
//! bootstrap's `dns:` section (else `/etc/resolv.conf`; `/etc/hosts` is read either way, as the
//! system resolver does).
//!
//! hickory's own answer cache is bypassed (each lookup clears the name first): the per-cluster
//! task *is* the cache, re-resolving at `min(TTL, refresh)`, and a `refresh` shorter than the
//! TTL must reach the name server to mean anything.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::TokioResolver;

use crate::config::{DnsConfig, IpFamily};

/// Most addresses kept per name: a bound on what one answer can add to a cluster.
pub const MAX_ADDRESSES_PER_NAME: usize = 64;

/// A successful resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The addresses, sorted and without duplicates (DNS servers rotate record order: sorting
    /// makes an unchanged answer compare equal), at most [`MAX_ADDRESSES_PER_NAME`].
    pub addrs: Vec<IpAddr>,
    /// How long the answer may be used (the smallest record TTL); `None` = no TTL given (e.g.
    /// `/etc/hosts`), the cluster's refresh period applies.
    pub ttl: Option<Duration>,
}

impl Answer {
    /// An answer of `addrs` (sorted, deduplicated and bounded here).
    pub fn new(mut addrs: Vec<IpAddr>, ttl: Option<Duration>) -> Self {
        addrs.sort_unstable();
        addrs.dedup();
        addrs.truncate(MAX_ADDRESSES_PER_NAME);
        Self { addrs, ttl }
    }
}

/// Why a resolution failed; the last good answer stays in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The name has no address records (NXDOMAIN, or no A/AAAA).
    #[error("{host}: no address records")]
    NoRecords {
        /// The name.
        host: String,
    },
    /// The name servers did not answer usefully (timeout, SERVFAIL, refused, bad name).
    #[error("{host}: {reason}")]
    Failed {
        /// The name.
        host: String,
        /// What went wrong.
        reason: String,
    },
}

impl ResolveError {
    /// The `result` label of `weft_dns_resolutions_total`.
    pub fn result_label(&self) -> &'static str {
        match self {
            Self::NoRecords { .. } => "no_records",
            Self::Failed { .. } => "error",
        }
    }
}

/// Resolves host names to addresses (a seam: the tests use a scripted resolver).
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host`.
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Answer, ResolveError>>;
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("dns: {0}")]
pub struct ResolverError(String);

/// How long one resolution may take when the bootstrap does not say (`dns.timeout`).
pub const DEFAULT_RESOLUTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy's stub resolver.
pub struct DnsResolver {
    inner: TokioResolver,
    /// One resolution's deadline, every name server and retry included: name servers that
    /// never answer (an unconnected UDP socket gets no ICMP errors) must not hold a cluster's
    /// refresh for the resolver's full retry schedule.
    deadline: Duration,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver").finish_non_exhaustive()
    }
}

fn strategy(family: IpFamily) -> LookupIpStrategy {
    match family {
        IpFamily::V4Preferred => LookupIpStrategy::Ipv4thenIpv6,
        IpFamily::V6Preferred => LookupIpStrategy::Ipv6thenIpv4,
        IpFamily::V4Only => LookupIpStrategy::Ipv4Only,
        IpFamily::V6Only => LookupIpStrategy::Ipv6Only,
        IpFamily::Both => LookupIpStrategy::Ipv4AndIpv6,
    }
}

impl DnsResolver {
    /// A resolver as `config` says: its name servers, else the system's (`/etc/resolv.conf`;
    /// unreadable or without name servers: 127.0.0.1:53, as glibc does, with a warning).
    pub fn from_config(config: &DnsConfig) -> Result<Self, ResolverError> {
        let servers = config.nameserver_addrs().map_err(ResolverError)?;
        let (resolver_config, mut opts) = if servers.is_empty() {
            match hickory_resolver::system_conf::read_system_conf() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "dns: cannot use /etc/resolv.conf; asking 127.0.0.1:53");
                    (
                        ResolverConfig::from_name_servers(vec![name_server(SocketAddr::from((
                            [127, 0, 0, 1],
                            53,
                        )))]),
                        ResolverOpts::default(),
                    )
                }
            }
        } else {
            (
                ResolverConfig::from_name_servers(servers.into_iter().map(name_server).collect()),
                ResolverOpts::default(),
            )
        };
        let deadline = config.timeout.unwrap_or(DEFAULT_RESOLUTION_TIMEOUT);
        // Each query within the deadline, so at least one retry fits in it.
        opts.timeout = opts.timeout.min(deadline / 2).max(Duration::from_millis(1));
        opts.ip_strategy = strategy(config.ip_family);
        // Only a handful of lookups are ever in flight (one per name per cluster, each at most
        // once a second): a small cache, cleared before each lookup anyway.
        opts.cache_size = 64;
        let inner = hickory_resolver::Resolver::builder_with_config(
            resolver_config,
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| ResolverError(e.to_string()))?;
        Ok(Self { inner, deadline })
    }
}

/// `addr` over UDP, with TCP for truncated answers.
fn name_server(addr: SocketAddr) -> NameServerConfig {
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    ns
}

fn failed(host: &str, e: &NetError) -> ResolveError {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(_)) => ResolveError::NoRecords {
            host: host.to_owned(),
        },
        other => ResolveError::Failed {
            host: host.to_owned(),
            reason: other.to_string(),
        },
    }
}

impl Resolve for DnsResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Answer, ResolveError>> {
        Box::pin(async move {
            for t in [RecordType::A, RecordType::AAAA] {
                self.inner.clear_lookup_cache(host, t);
            }
            let lookup = tokio::time::timeout(self.deadline, self.inner.lookup_ip(host))
                .await
                .map_err(|_| ResolveError::Failed {
                    host: host.to_owned(),
                    reason: format!("no answer within {:?}", self.deadline),
                })?
                .map_err(|e| failed(host, &e))?;
            let addrs: Vec<IpAddr> = lookup.iter().collect();
            if addrs.is_empty() {
                return Err(ResolveError::NoRecords {
                    host: host.to_owned(),
                });
            }
            // hosts-file answers carry hickory's maximum TTL (a day): no TTL, the refresh rules.
            let left = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            let ttl = (left < Duration::from_secs(u64::from(hickory_resolver::MAX_TTL) / 2))
                .then_some(left);
            Ok(Answer::new(addrs, ttl))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    /// A one-name DNS server on loopback answering A queries for `name` with `ip` (TTL `ttl`),
    /// NXDOMAIN for anything else; written with hickory-proto's wire format.
    async fn dns_server(name: &'static str, ip: std::net::Ipv4Addr, ttl: u32) -> SocketAddr {
        use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
        use hickory_resolver::proto::rr::{rdata::A, Name, RData, Record};
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            // Bounded: a test asks a few names.
            for _ in 0..100 {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::response(q.metadata.id, q.metadata.op_code);
                resp.metadata.message_type = MessageType::Response;
                resp.metadata.recursion_available = true;
                resp.add_queries(q.queries.clone());
                let query = &q.queries[0];
                let wanted = Name::from_ascii(name).unwrap();
                if query.name().to_lowercase() != wanted.to_lowercase() {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                } else if query.query_type() == RecordType::A {
                    resp.add_answer(Record::from_rdata(
                        query.name().clone(),
                        ttl,
                        RData::A(A(ip)),
                    ));
                }
                let _ = sock.send_to(&resp.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    fn config(server: SocketAddr) -> DnsConfig {
        DnsConfig {
            nameservers: vec![server.to_string()],
            timeout: Some(Duration::from_millis(500)),
            ip_family: IpFamily::V4Preferred,
        }
    }

    #[tokio::test]
    async fn resolves_through_the_configured_server_with_its_ttl() {
        let server = dns_server("api.external.test.", [127, 0, 0, 9].into(), 7).await;
        let r = DnsResolver::from_config(&config(server)).unwrap();
        let a = r.resolve("api.external.test").await.unwrap();
        assert_eq!(a.addrs, [IpAddr::from([127, 0, 0, 9])]);
        let ttl = a.ttl.unwrap();
        assert!(
            ttl <= Duration::from_secs(7) && ttl >= Duration::from_secs(5),
            "{ttl:?}"
        );
        // Asked again, the server is asked again (no stale cache between refreshes).
        assert_eq!(r.resolve("api.external.test").await.unwrap().addrs, a.addrs);
        let e = r.resolve("nope.external.test").await.unwrap_err();
        assert_eq!(e.result_label(), "no_records", "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_is_an_error() {
        // Bound and never read: queries time out.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut c = config(silent.local_addr().unwrap());
        c.timeout = Some(Duration::from_millis(100));
        let r = DnsResolver::from_config(&c).unwrap();
        let e = r.resolve("api.external.test").await.unwrap_err();
        assert_eq!(e.result_label(), "error", "{e}");
    }

    #[test]
    fn answers_are_sorted_deduplicated_and_bounded() {
        let a = Answer::new(
            vec![
                [10, 0, 0, 2].into(),
                [10, 0, 0, 1].into(),
                [10, 0, 0, 2].into(),
            ],
            None,
        );
        assert_eq!(a.addrs, [IpAddr::from([10, 0, 0, 1]), [10, 0, 0, 2].into()]);
        let many = (0..=255u8).map(|i| IpAddr::from([10, 0, 1, i])).collect();
        assert_eq!(Answer::new(many, None).addrs.len(), MAX_ADDRESSES_PER_NAME);
    }
}
