//! One simulated proxy: what a `weft-proxy` does on its control channel, without a data path.
//!
//! - **Identity**: a P-256 key and CSR (as `proxy/src/tls/renew.rs` makes them), certified by
//!   `Identity.Certify` with its service's join token.
//! - **Discovery**: its own TLS connection presenting that SVID as the client certificate
//!   (`proxy/src/tls/control.rs`), one `Discovery.Stream`, a `Hello{node, held versions}`; every
//!   `DiscoveryResponse` is decoded with the real proto types and merged with the sets held
//!   (state of the world per type), then answered with `Ack{nonce, every version held}`, as
//!   `proxy/src/discovery.rs` does. A stream that fails is reopened with jittered backoff
//!   (100 ms doubling to 5 s) and a Hello carrying the held versions.
//!
//! Instead of a snapshot it keeps only what the benchmark checks: per cluster of the mesh, the
//! endpoint count and the retry of the routes to it. After each ACK it tells the [`Board`]
//! whether it now holds what the current [`Phase`] expects.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use rand::Rng as _;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::identity_client::IdentityClient;
use weft_proto::v1::{self, ResourceType};

use crate::mesh::{Plan, NAMESPACE};

/// How many phases a run has at most (cold start + the applies).
pub const MAX_PHASES: usize = 8;

/// Where a simulated proxy connects.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://ip:port` of the replica's gRPC port.
    pub url: String,
    /// PEM roots verifying it (`<ca-dir>/roots.pem`).
    pub roots_pem: String,
}

/// A simulated proxy's certificate and key (PEM).
#[derive(Clone)]
pub struct Svid {
    pub chain_pem: String,
    pub key_pem: String,
}

/// A gRPC channel to `target` without a client certificate (for `Identity.Certify`).
pub async fn identity_channel(target: &Target) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&target.roots_pem));
    Ok(endpoint(&target.url)?.tls_config(tls)?.connect().await?)
}

/// The endpoint settings of the real proxy's control channel (`control_endpoint`).
fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Makes a key and CSR and has `client` certify them as `service` (namespace [`NAMESPACE`]).
pub async fn certify(
    client: &mut IdentityClient<Channel>,
    service: &str,
    token: &str,
) -> anyhow::Result<Svid> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr_pem = CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let resp = client
        .certify(v1::CertifyRequest {
            csr_pem,
            token: token.to_owned(),
            service: service.to_owned(),
            namespace: NAMESPACE.to_owned(),
            requested_ttl_seconds: 0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("Certify {NAMESPACE}/{service}: {}", s.message()))?
        .into_inner();
    Ok(Svid {
        chain_pem: resp.cert_chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// What the proxies must hold for a phase to be over.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Index into every record's per-phase slots (< [`MAX_PHASES`]).
    pub index: usize,
    /// Each cluster's endpoint count must equal its service's instances: the phase ends when
    /// the mesh is fully registered (cold start).
    pub endpoints_complete: bool,
    /// `max_retries` every route to service `j` must carry (`None`: not checked).
    pub retries: Option<Vec<u32>>,
    /// Which proxies the phase is about (the others count only their pushes).
    pub affected: Vec<bool>,
}

/// Pushes received, by phase.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Pushes {
    pub count: u64,
    /// Encoded size of the `DiscoveryResponse` messages (protobuf bytes, before gRPC framing
    /// and TLS).
    pub bytes: u64,
    pub max_bytes: u64,
}

impl Pushes {
    fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
        self.max_bytes = self.max_bytes.max(bytes);
    }

    pub fn merge(&mut self, other: &Pushes) {
        self.count += other.count;
        self.bytes += other.bytes;
        self.max_bytes = self.max_bytes.max(other.max_bytes);
    }
}

/// What one simulated proxy reports.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Since the board's origin: when its (first) stream was open.
    pub connected_at: Option<Duration>,
    /// Per phase: when it ACKed the push that gave it what the phase expects.
    pub converged_at: [Option<Duration>; MAX_PHASES],
    pub pushes: [Pushes; MAX_PHASES],
    /// Streams that ended or failed (each one is reopened).
    pub stream_failures: u32,
    pub last_error: Option<String>,
}

/// Shared by the driver and every simulated proxy.
#[derive(Debug)]
pub struct Board {
    origin: Instant,
    phase: RwLock<Arc<Phase>>,
    records: Vec<Mutex<Record>>,
    /// Proxies converged in the current phase.
    converged: AtomicUsize,
    /// Nanoseconds since `origin` of the last push received by anyone.
    last_push: AtomicU64,
    pushes_total: AtomicU64,
    pub changed: Notify,
}

impl Board {
    pub fn new(proxies: usize, first: Phase) -> Board {
        Board {
            origin: Instant::now(),
            phase: RwLock::new(Arc::new(first)),
            records: (0..proxies)
                .map(|_| Mutex::new(Record::default()))
                .collect(),
            converged: AtomicUsize::new(0),
            last_push: AtomicU64::new(0),
            pushes_total: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// Time since the board was made.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Starts `phase`: convergence is counted afresh.
    pub fn set_phase(&self, phase: Phase) {
        *self.phase.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(phase);
        self.converged.store(0, Ordering::SeqCst);
    }

    pub fn phase(&self) -> Arc<Phase> {
        Arc::clone(&self.phase.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Proxies converged in the current phase.
    pub fn converged(&self) -> usize {
        self.converged.load(Ordering::SeqCst)
    }

    /// When the last push arrived (since the origin) and how many arrived in all.
    pub fn last_push(&self) -> (Duration, u64) {
        (
            Duration::from_nanos(self.last_push.load(Ordering::SeqCst)),
            self.pushes_total.load(Ordering::SeqCst),
        )
    }

    pub fn record(&self, i: usize) -> Record {
        self.records[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn with_record<T>(&self, i: usize, f: impl FnOnce(&mut Record) -> T) -> T {
        f(&mut self.records[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }
}

/// What a simulated proxy holds, in the compact form the checks need.
#[derive(Debug, Default)]
struct Held {
    /// Version per resource type (index = `ResourceType as usize`).
    versions: [Option<String>; 7],
    /// `(cluster index, endpoint count)` of the mesh's clusters in the held ENDPOINTS, sorted.
    endpoints: Vec<(u32, u32)>,
    /// `(cluster index, max_retries)` of every route of the held ROUTES to a mesh cluster.
    routes: Vec<(u32, u32)>,
}

impl Held {
    /// Merges a response (each set it carries replaces the held one; an endpoint delta is
    /// applied to the held endpoints), or refuses it whole, as weft-proxy does, when it carries
    /// an endpoint delta against another set than the one held: the reason to NACK with.
    fn merge(&mut self, resp: &v1::DiscoveryResponse, plan: &Plan) -> Result<(), String> {
        if let Some(d) = &resp.endpoint_delta {
            let held = self.versions[ResourceType::Endpoints as usize].as_deref();
            if resp.endpoints.is_some() {
                return Err(format!(
                    "endpoint delta {} arrived with a whole endpoint set",
                    d.version
                ));
            }
            if held != Some(d.base_version.as_str()) {
                return Err(format!(
                    "endpoint delta {} is against endpoints {}, but this proxy holds {}",
                    d.version,
                    d.base_version,
                    held.unwrap_or("none")
                ));
            }
        }
        let mut set = |t: ResourceType, v: &str| self.versions[t as usize] = Some(v.to_owned());
        if let Some(s) = &resp.listeners {
            set(ResourceType::Listeners, &s.version);
        }
        if let Some(s) = &resp.clusters {
            set(ResourceType::Clusters, &s.version);
        }
        if let Some(s) = &resp.policies {
            set(ResourceType::Policies, &s.version);
        }
        if let Some(s) = &resp.trust {
            set(ResourceType::Trust, &s.version);
        }
        if let Some(s) = &resp.routes {
            set(ResourceType::Routes, &s.version);
            self.routes = s
                .tables
                .iter()
                .flat_map(|t| &t.routes)
                .flat_map(|r| {
                    let retries = r.retry.as_ref().map_or(0, |x| x.max_retries);
                    r.destinations
                        .iter()
                        .filter_map(move |d| plan.cluster_index(&d.cluster).map(|c| (c, retries)))
                })
                .collect();
        }
        if let Some(s) = &resp.endpoints {
            set(ResourceType::Endpoints, &s.version);
            let mut counts: Vec<(u32, u32)> = s
                .clusters
                .iter()
                .filter_map(|c| {
                    let n = u32::try_from(c.endpoints.len()).unwrap_or(u32::MAX);
                    plan.cluster_index(&c.cluster).map(|i| (i, n))
                })
                .collect();
            counts.sort_unstable();
            self.endpoints = counts;
        }
        if let Some(d) = &resp.endpoint_delta {
            self.versions[ResourceType::Endpoints as usize] = Some(d.version.clone());
            for c in &d.clusters {
                let Some(i) = plan.cluster_index(&c.cluster) else {
                    continue;
                };
                let n = u32::try_from(c.endpoints.len()).unwrap_or(u32::MAX);
                match self.endpoints.binary_search_by_key(&i, |(c, _)| *c) {
                    Ok(at) => self.endpoints[at].1 = n,
                    Err(at) => self.endpoints.insert(at, (i, n)),
                }
            }
            for name in &d.removed {
                if let Some(i) = plan.cluster_index(name) {
                    if let Ok(at) = self.endpoints.binary_search_by_key(&i, |(c, _)| *c) {
                        self.endpoints.remove(at);
                    }
                }
            }
        }
        Ok(())
    }

    /// Every version held, for Hello and Ack.
    fn type_versions(&self) -> Vec<v1::TypeVersion> {
        self.versions
            .iter()
            .enumerate()
            .filter_map(|(t, v)| {
                Some(v1::TypeVersion {
                    r#type: i32::try_from(t).ok()?,
                    version: v.clone()?,
                })
            })
            .collect()
    }

    /// Whether this proxy (of service `service`) holds what `phase` expects.
    fn satisfies(&self, phase: &Phase, plan: &Plan, service: usize) -> bool {
        if phase.endpoints_complete {
            let complete = plan.callable(service).into_iter().all(|j| {
                let want = plan.instances(j);
                let idx = u32::try_from(j).unwrap_or(u32::MAX);
                self.endpoints
                    .binary_search_by_key(&idx, |(c, _)| *c)
                    .is_ok_and(|at| self.endpoints[at].1 == want)
            });
            if !complete {
                return false;
            }
        }
        if let Some(retries) = &phase.retries {
            if self.routes.is_empty() && !plan.callable(service).is_empty() {
                return false;
            }
            return self
                .routes
                .iter()
                .all(|(c, r)| retries.get(*c as usize) == Some(r));
        }
        true
    }
}

/// One simulated proxy.
pub struct Sim {
    pub index: usize,
    pub service: usize,
    pub node: v1::Node,
    pub target: Target,
    pub svid: Svid,
}

impl Sim {
    /// The node a simulated proxy announces: its own loopback address (nothing listens there;
    /// registrations only announce it).
    pub fn node(index: usize, service: usize) -> v1::Node {
        let ip = format!(
            "127.{}.{}.{}",
            100 + index / 62_500,
            (index / 250) % 250,
            index % 250 + 1
        );
        v1::Node {
            id: format!("sim-{index}"),
            service: Plan::service_name(service),
            namespace: NAMESPACE.to_owned(),
            labels: [("weft-scale".to_owned(), "sim".to_owned())].into(),
            inbound_address: format!("{ip}:15006"),
            outbound_address: format!("{ip}:15001"),
            app_address: format!("{ip}:8080"),
            tcp_bind_ip: ip,
            build_version: concat!("weft-scale/", env!("CARGO_PKG_VERSION")).to_owned(),
            // As weft-proxy: endpoint changes may come as deltas ([`Held::merge`]).
            capabilities: vec!["endpoint-delta".to_owned()],
            ..Default::default()
        }
    }

    /// Runs streams until `stop` is notified; reconnects with backoff like the real proxy.
    pub async fn run(self, plan: Arc<Plan>, board: Arc<Board>, connects: Arc<Semaphore>) {
        let mut held = Held::default();
        let mut attempt: u32 = 0;
        loop {
            let result = self.stream(&plan, &board, &connects, &mut held).await;
            let message = match result {
                Ok(()) => "the control plane ended the stream".to_owned(),
                Err(e) => format!("{e:#}"),
            };
            board.with_record(self.index, |r| {
                r.stream_failures += 1;
                r.last_error = Some(message);
            });
            let ceiling = (100u64 << attempt.min(6)).min(5000);
            attempt = attempt.saturating_add(1);
            let delay = rand::rng().random_range(0..=ceiling);
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    async fn connect(&self) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.target.roots_pem))
            .identity(Identity::from_pem(&self.svid.chain_pem, &self.svid.key_pem));
        Ok(endpoint(&self.target.url)?
            .tls_config(tls)?
            .connect()
            .await?)
    }

    async fn stream(
        &self,
        plan: &Plan,
        board: &Board,
        connects: &Semaphore,
        held: &mut Held,
    ) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel(8);
        let hello = v1::DiscoveryRequest {
            kind: Some(Kind::Hello(v1::Hello {
                node: Some(self.node.clone()),
                held: held.type_versions(),
            })),
        };
        tx.send(hello).await?;
        let mut responses = {
            // Bounds the handshakes in flight (the real proxies start over time, not at once).
            let _permit = connects.acquire().await?;
            let channel = self.connect().await?;
            let mut client = DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
            client
                .stream(ReceiverStream::new(rx))
                .await
                .map_err(|s| anyhow::anyhow!("Discovery.Stream: {}", s.message()))?
                .into_inner()
        };
        let open_at = board.now();
        board.with_record(self.index, |r| {
            r.connected_at.get_or_insert(open_at);
        });
        while let Some(resp) = responses
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        {
            let bytes = resp.encoded_len() as u64;
            let answer = match held.merge(&resp, plan) {
                Ok(()) => Kind::Ack(v1::Ack {
                    nonce: resp.nonce,
                    versions: held.type_versions(),
                }),
                Err(error) => Kind::Nack(v1::Nack {
                    rejected: resp
                        .endpoint_delta
                        .iter()
                        .map(|d| v1::TypeVersion {
                            r#type: ResourceType::Endpoints as i32,
                            version: d.version.clone(),
                        })
                        .collect(),
                    nonce: resp.nonce,
                    error,
                }),
            };
            tx.send(v1::DiscoveryRequest { kind: Some(answer) }).await?;
            let at = board.now();
            let phase = board.phase();
            let satisfied = phase.affected.get(self.index).copied().unwrap_or(false)
                && held.satisfies(&phase, plan, self.service);
            let newly = board.with_record(self.index, |r| {
                r.pushes[phase.index].add(bytes);
                if satisfied && r.converged_at[phase.index].is_none() {
                    r.converged_at[phase.index] = Some(at);
                    true
                } else {
                    false
                }
            });
            board.pushes_total.fetch_add(1, Ordering::SeqCst);
            board.last_push.store(
                u64::try_from(at.as_nanos()).unwrap_or(u64::MAX),
                Ordering::SeqCst,
            );
            if newly {
                board.converged.fetch_add(1, Ordering::SeqCst);
                board.changed.notify_one();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(plan_clusters: &[(usize, u32)]) -> v1::DiscoveryResponse {
        v1::DiscoveryResponse {
            nonce: "1".into(),
            routes: Some(v1::RouteSet {
                version: "r1".into(),
                tables: vec![v1::RouteTable {
                    name: "outbound".into(),
                    routes: plan_clusters
                        .iter()
                        .map(|(j, retries)| v1::Route {
                            name: format!("default-{}", Plan::cluster_name(*j)),
                            destinations: vec![v1::WeightedCluster {
                                cluster: Plan::cluster_name(*j),
                                weight: 100,
                            }],
                            retry: Some(v1::RetryPolicy {
                                max_retries: *retries,
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }],
            }),
            ..Default::default()
        }
    }

    fn endpoints(counts: &[(usize, usize)]) -> v1::DiscoveryResponse {
        v1::DiscoveryResponse {
            nonce: "2".into(),
            endpoints: Some(v1::EndpointSet {
                version: "e1".into(),
                clusters: counts
                    .iter()
                    .map(|(j, n)| v1::ClusterEndpoints {
                        cluster: Plan::cluster_name(*j),
                        endpoints: vec![v1::Endpoint::default(); *n],
                    })
                    .chain([v1::ClusterEndpoints {
                        cluster: "inbound".into(),
                        endpoints: vec![v1::Endpoint::default()],
                    }])
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn acks_carry_every_held_version() {
        let plan = Plan::new(4, 2, 1).unwrap();
        let mut held = Held::default();
        held.merge(&routes(&[(1, 2)]), &plan).unwrap();
        held.merge(&endpoints(&[(1, 2)]), &plan).unwrap();
        let versions = held.type_versions();
        assert_eq!(
            versions,
            [
                v1::TypeVersion {
                    r#type: ResourceType::Routes as i32,
                    version: "r1".into()
                },
                v1::TypeVersion {
                    r#type: ResourceType::Endpoints as i32,
                    version: "e1".into()
                },
            ]
        );
    }

    #[test]
    fn phases_are_checked_against_what_is_held() {
        // 4 proxies over 2 services, each calling the other: 2 instances each.
        let plan = Plan::new(4, 2, 1).unwrap();
        let cold = Phase {
            index: 0,
            endpoints_complete: true,
            retries: None,
            affected: vec![true; 4],
        };
        let mut held = Held::default();
        assert!(!held.satisfies(&cold, &plan, 0));
        held.merge(&endpoints(&[(1, 1)]), &plan).unwrap();
        assert!(!held.satisfies(&cold, &plan, 0), "one endpoint of two");
        held.merge(&endpoints(&[(1, 2)]), &plan).unwrap();
        assert!(held.satisfies(&cold, &plan, 0));
        assert!(
            !held.satisfies(&cold, &plan, 1),
            "service 1 calls service 0"
        );

        let apply = Phase {
            index: 1,
            endpoints_complete: false,
            retries: Some(vec![3, 3]),
            affected: vec![true; 4],
        };
        assert!(!held.satisfies(&apply, &plan, 0), "no routes yet");
        held.merge(&routes(&[(1, 2)]), &plan).unwrap();
        assert!(!held.satisfies(&apply, &plan, 0));
        held.merge(&routes(&[(1, 3)]), &plan).unwrap();
        assert!(held.satisfies(&apply, &plan, 0));
    }

    #[test]
    fn endpoint_deltas_apply_to_the_held_set_or_are_refused_whole() {
        // 4 proxies over 2 services: clusters svc-0 and svc-1.
        let plan = Plan::new(4, 2, 1).unwrap();
        let mut held = Held::default();
        held.merge(&endpoints(&[(0, 2), (1, 2)]), &plan).unwrap();
        let delta = |base: &str, version: &str, clusters: &[(usize, usize)], removed: &[usize]| {
            v1::DiscoveryResponse {
                nonce: version.into(),
                endpoint_delta: Some(v1::EndpointDelta {
                    version: version.into(),
                    base_version: base.into(),
                    clusters: endpoints(clusters).endpoints.unwrap().clusters,
                    removed: removed.iter().map(|&i| Plan::cluster_name(i)).collect(),
                }),
                ..Default::default()
            }
        };
        let e = held.merge(&delta("other", "e2", &[(1, 3)], &[]), &plan);
        assert!(e.unwrap_err().contains("holds e1"));
        assert_eq!(
            held.endpoints,
            [(0, 2), (1, 2)],
            "nothing merged from a refused delta"
        );
        held.merge(&delta("e1", "e2", &[(1, 3)], &[0]), &plan)
            .unwrap();
        assert_eq!(held.endpoints, [(1, 3)]);
        assert_eq!(
            held.versions[ResourceType::Endpoints as usize].as_deref(),
            Some("e2")
        );
        assert!(Sim::node(0, 0)
            .capabilities
            .contains(&"endpoint-delta".to_owned()));
    }

    #[test]
    fn nodes_have_distinct_addresses() {
        let a = Sim::node(0, 0);
        let b = Sim::node(250, 0);
        let c = Sim::node(62_500, 0);
        assert_eq!(a.inbound_address, "127.100.0.1:15006");
        assert_eq!(b.inbound_address, "127.100.1.1:15006");
        assert_eq!(c.inbound_address, "127.101.0.1:15006");
        assert_eq!(a.service, "svc-0");
    }
}
