//! The `weft.v1.Discovery` gRPC service: one task per proxy stream.
//!
//! Per stream: the caller is authenticated by its TLS client certificate (its SVID; see
//! [`crate::admission`]); the first message must be `Hello`, within the Hello deadline; the node
//! is admitted (its claims checked against the certificate, its fields bounded) and registered; then the task pushes
//! one `DiscoveryResponse` holding only the resource types whose version differs from what the
//! proxy holds, waits for its Ack/Nack (at most one push outstanding), and recomputes whenever
//! it was woken meanwhile (changes coalesce into one push): by a new trust bundle, and by the
//! policy and registry changes that may affect its scope (`crate::push::wake`).
//!
//! A push left unanswered for the push timeout is considered lost: it is logged and counted
//! (`weft_control_pushes_total{result="timeout"}`), and the stream pushes again on the next
//! change, against what the proxy last ACKed (so the lost types are resent). A late answer to
//! the lost nonce is treated as stale, though an ACK's versions still update what the proxy
//! holds.
//!
//! Convergence (`weft_control_push_duration_seconds`) runs from the first change the proxy had
//! not yet been sent (or its connect, for the first push) to the ACK of the push carrying it.
//!
//! **Resumed streams.** A proxy that reconnects (to this replica or, with several replicas, from
//! another one that died) lists in its Hello the versions it holds; they count as ACKed, so the
//! first push carries only the types whose version differs, and nothing when none does.
//! Versions are content hashes of what is compiled, and every replica compiles the same inputs
//! (the same policy revision, the same registrations from the store; see
//! `state::remote`), so a proxy moving between replicas of one mesh is pushed nothing.
//!
//! **Endpoint deltas.** A proxy whose Node lists `endpoint-delta` gets its ENDPOINTS as a
//! delta against the set it ACKed when that is smaller ([`crate::push::delta`]); a NACKed delta
//! is pushed again at once as the whole set.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::discovery_server::Discovery;
use weft_proto::v1::{DiscoveryRequest, DiscoveryResponse, Hello, Node, ResourceType, TypeVersion};

use crate::admission::{self, Caller, Refusal};
use crate::compile::{type_name, Resources};
use crate::push::delta::{self, EndpointPushes, EndpointStream};
use crate::state::ControlPlane;

/// One item of a proxy's response stream, boxed (see `DiscoveryService::stream`).
type PushItem = Box<Result<DiscoveryResponse, Status>>;

/// How the caller of a discovery stream is authenticated (see [`crate::admission`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationAuth {
    /// The proxy's SVID, presented as the TLS client certificate and verified against the
    /// trust bundle by the TLS layer, must be a workload identity of this trust domain; the
    /// registered service and namespace are the certificate's.
    Svid { trust_domain: String },
    /// `--insecure-grpc`: the Hello's claims are taken as made (still bounded and parsed).
    Insecure,
}

/// The discovery gRPC service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    cp: Arc<ControlPlane>,
    auth: RegistrationAuth,
    endpoint_pushes: EndpointPushes,
}

impl DiscoveryService {
    pub fn new(cp: Arc<ControlPlane>, auth: RegistrationAuth) -> Self {
        let endpoint_pushes = EndpointPushes::register(cp.metrics());
        Self {
            cp,
            auth,
            endpoint_pushes,
        }
    }

    /// Who the caller is, from its verified client certificate; with the certificate's
    /// `notAfter` (the stream ends then, so an expired identity never keeps a registration).
    fn caller<T>(&self, request: &Request<T>) -> Result<(Caller, Option<SystemTime>), Refusal> {
        let RegistrationAuth::Svid { trust_domain } = &self.auth else {
            return Ok((Caller::Unverified, None));
        };
        let certs = request.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        let caller = admission::caller_from_chain(leaf.map(AsRef::as_ref), trust_domain)?;
        let not_after = leaf
            .and_then(|l| weft_spiffe::validity(l.as_ref()).ok())
            .and_then(|(_, na)| u64::try_from(na).ok())
            .map(|na| UNIX_EPOCH + Duration::from_secs(na));
        Ok((caller, not_after))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (caller, cert_expiry) = match self.caller(&request) {
            Ok(c) => c,
            Err(refusal) => return Err(refuse(&self.cp, &refusal, request.remote_addr())),
        };
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        // Answer headers at once and read the Hello in the task: a client may well wait for the
        // response headers before it sends anything.
        // Boxed items: tokio's channel allocates a block of 32 slots whatever the capacity, and an
        // unboxed `Result<DiscoveryResponse, Status>` is ~380 bytes: 12 KB per proxy's stream
        // (benches/RESULTS.md, control-plane scale).
        let (tx, rx) = mpsc::channel::<PushItem>(4);
        tokio::spawn(run_stream(
            Arc::clone(&self.cp),
            Admission {
                caller,
                peer,
                cert_expiry,
            },
            inbound,
            tx,
            self.endpoint_pushes.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|b| *b))))
    }
}

static NONCE: AtomicU64 = AtomicU64::new(1);

fn next_nonce() -> String {
    NONCE.fetch_add(1, Ordering::Relaxed).to_string()
}

/// A response sent and not yet answered.
#[derive(Debug)]
struct Pending {
    nonce: String,
    versions: HashMap<i32, String>,
    generation: u64,
    /// When the earliest change this push carries happened (convergence start).
    changed_at: Instant,
    sent_at: Instant,
}

/// Versions a proxy NACKed: not re-sent until the generation moves past `generation`.
#[derive(Debug)]
struct Rejected {
    generation: u64,
    versions: HashMap<i32, String>,
}

/// Deregisters the stream however the task ends.
struct Connection {
    cp: Arc<ControlPlane>,
    id: String,
    session: u64,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.cp.disconnect(&self.id, self.session);
        tracing::info!(proxy = %self.id, "proxy disconnected");
    }
}

async fn read_hello(inbound: &mut Streaming<DiscoveryRequest>) -> Result<Hello, Status> {
    let hello = match inbound.next().await {
        Some(Ok(DiscoveryRequest {
            kind: Some(Kind::Hello(hello)),
        })) => hello,
        Some(Ok(_)) => {
            return Err(Status::invalid_argument(
                "the first message on a discovery stream must be Hello",
            ))
        }
        Some(Err(status)) => return Err(status),
        None => return Err(Status::cancelled("the stream ended before its Hello")),
    };
    if hello.node.is_none() {
        return Err(Status::invalid_argument("Hello.node is required"));
    }
    Ok(hello)
}

/// What is known of a stream's caller before its Hello.
struct Admission {
    caller: Caller,
    peer: Option<SocketAddr>,
    /// The client certificate's `notAfter`: the stream ends then.
    cert_expiry: Option<SystemTime>,
}

/// Logs and counts a refused registration; the status to end the stream with.
fn refuse(cp: &ControlPlane, refusal: &Refusal, peer: Option<SocketAddr>) -> Status {
    tracing::warn!(peer = ?peer, reason = refusal.reason(), "refusing discovery stream: {refusal}");
    cp.metrics()
        .registrations_refused_total
        .with_label_values(&[refusal.reason()])
        .inc();
    refusal.status()
}

/// Reads the Hello within the deadline and admits its node ([`admission::admit`]).
async fn admit_hello(
    cp: &ControlPlane,
    admission: &Admission,
    inbound: &mut Streaming<DiscoveryRequest>,
) -> Result<(Node, Vec<TypeVersion>), Status> {
    let limits = cp.limits();
    let hello = match tokio::time::timeout(limits.hello_timeout, read_hello(inbound)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(status)) => {
            // No readable Hello: not a message at all, over the message cap, or another kind
            // (a client that just went away is no refusal).
            tracing::warn!(peer = ?admission.peer, error = %status.message(), "rejecting discovery stream");
            if status.code() != tonic::Code::Cancelled {
                cp.metrics()
                    .registrations_refused_total
                    .with_label_values(&["invalid"])
                    .inc();
            }
            return Err(status);
        }
        Err(_) => {
            return Err(refuse(
                cp,
                &Refusal::HelloTimeout(limits.hello_timeout),
                admission.peer,
            ))
        }
    };
    let node = hello.node.unwrap_or_default();
    let node = admission::admit(node, &admission.caller, admission.peer, limits)
        .map_err(|r| refuse(cp, &r, admission.peer))?;
    Ok((node, hello.held))
}

/// Builds a response with every type whose version differs from `held` and was not rejected
/// (in this generation); `None` when there is nothing to send.
fn build_response(
    resources: Resources,
    held: &HashMap<i32, String>,
    rejected: Option<&Rejected>,
    generation: u64,
    changed_at: Instant,
) -> Option<(DiscoveryResponse, Pending)> {
    let wanted = |t: ResourceType, version: &str| {
        let key = t as i32;
        held.get(&key).is_none_or(|v| v != version)
            && rejected.is_none_or(|r| r.versions.get(&key).is_none_or(|v| v != version))
    };
    let mut versions = HashMap::new();
    let mut response = DiscoveryResponse::default();
    let Resources {
        listeners,
        routes,
        clusters,
        endpoints,
        policies,
        trust,
    } = resources;
    if wanted(ResourceType::Listeners, &listeners.version) {
        versions.insert(ResourceType::Listeners as i32, listeners.version.clone());
        response.listeners = Some(listeners);
    }
    if wanted(ResourceType::Routes, &routes.version) {
        versions.insert(ResourceType::Routes as i32, routes.version.clone());
        response.routes = Some(routes);
    }
    if wanted(ResourceType::Clusters, &clusters.version) {
        versions.insert(ResourceType::Clusters as i32, clusters.version.clone());
        response.clusters = Some(clusters);
    }
    if wanted(ResourceType::Endpoints, &endpoints.version) {
        versions.insert(ResourceType::Endpoints as i32, endpoints.version.clone());
        response.endpoints = Some(endpoints);
    }
    if wanted(ResourceType::Policies, &policies.version) {
        versions.insert(ResourceType::Policies as i32, policies.version.clone());
        response.policies = Some(policies);
    }
    if wanted(ResourceType::Trust, &trust.version) {
        versions.insert(ResourceType::Trust as i32, trust.version.clone());
        response.trust = Some(trust);
    }
    if versions.is_empty() {
        return None;
    }
    let nonce = next_nonce();
    response.nonce = nonce.clone();
    Some((
        response,
        Pending {
            nonce,
            versions,
            generation,
            changed_at,
            sent_at: Instant::now(),
        },
    ))
}

fn versions_map(list: &[TypeVersion]) -> HashMap<i32, String> {
    list.iter()
        .filter(|tv| tv.r#type != ResourceType::Unspecified as i32)
        .map(|tv| (tv.r#type, tv.version.clone()))
        .collect()
}

/// Counts a push's outcome per type; an ACK also ends its convergence time.
fn record_answer(cp: &ControlPlane, pending: &Pending, result: &str) {
    let m = cp.metrics();
    if result == "ack" {
        m.push_duration_seconds
            .observe(pending.changed_at.elapsed().as_secs_f64());
    }
    for t in pending.versions.keys() {
        if let Ok(t) = ResourceType::try_from(*t) {
            m.pushes_total
                .with_label_values(&[type_name(t), result])
                .inc();
        }
    }
}

/// Sends one item on a proxy's response stream; `false` when the stream is gone. Boxed: the
/// send future (its semaphore waiter) lives only while the channel is full, and unboxed it would
/// widen every stream task's future for its whole life (tokio sizes a task by its largest state).
fn send(
    tx: &mpsc::Sender<PushItem>,
    item: Result<DiscoveryResponse, Status>,
) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
    Box::pin(async move { tx.send(Box::new(item)).await.is_ok() })
}

/// Sends an item already boxed ([`send`]).
fn send_item(
    tx: &mpsc::Sender<PushItem>,
    item: PushItem,
) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
    Box::pin(async move { tx.send(item).await.is_ok() })
}

/// Compiles `node`'s resources and builds the push of what it does not hold (endpoints as a
/// delta when they may be: [`EndpointStream::prepare`]), boxed for the stream; with whether a
/// policy change raced the compilation. Not async: none of it lives in the stream's future.
fn compose(
    cp: &ControlPlane,
    node: &Node,
    held: &HashMap<i32, String>,
    rejected: Option<&Rejected>,
    generation: u64,
    changed_at: Instant,
    endpoints: &mut EndpointStream,
) -> (Option<(PushItem, Pending)>, bool) {
    let (resources, policy) = cp.compile_for_at(node);
    let raced = !cp.serves(&policy);
    let held_endpoints = held
        .get(&(ResourceType::Endpoints as i32))
        .map(String::as_str);
    endpoints.learn(held_endpoints, &resources.endpoints);
    let response = build_response(resources, held, rejected, generation, changed_at).map(
        |(mut response, pending)| {
            endpoints.prepare(&mut response, held_endpoints);
            (Box::new(Ok(response)), pending)
        },
    );
    (response, raced)
}

/// Reads and admits the Hello, then registers the node: its node, the versions it holds, its
/// session, when it connected and whether it applies endpoint deltas. On a refusal the status
/// is sent to the proxy and `None` returned. Its own future (the Hello deadline, the read): the
/// caller boxes it, so that state does not stay in the stream's future after admission.
async fn admit_and_connect(
    cp: &ControlPlane,
    admission: Admission,
    inbound: &mut Streaming<DiscoveryRequest>,
    tx: &mpsc::Sender<PushItem>,
) -> Option<(Node, HashMap<i32, String>, u64, Instant, bool)> {
    let (mut node, held) = match admit_hello(cp, &admission, inbound).await {
        Ok(admitted) => admitted,
        Err(status) => {
            send(tx, Err(status)).await;
            return None;
        }
    };
    let capable = delta::advertised(&node);
    // Read here and not kept: the list is the proxy's to make up (unbounded), and the
    // registration stores the node.
    node.capabilities = Vec::new();
    let held = versions_map(&held);
    let connected_at = Instant::now();
    match cp.connect(&node) {
        Ok(session) => Some((node, held, session, connected_at, capable)),
        Err(refusal) => {
            send(tx, Err(refuse(cp, &refusal, admission.peer))).await;
            None
        }
    }
}

async fn run_stream(
    cp: Arc<ControlPlane>,
    admission: Admission,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<PushItem>,
    endpoint_pushes: EndpointPushes,
) {
    // Only the certificate's expiry is kept: the rest of the admission is not needed after it.
    let cert_expiry = admission.cert_expiry;
    let Some((node, mut held, session, connected_at, capable)) =
        Box::pin(admit_and_connect(&cp, admission, &mut inbound, &tx)).await
    else {
        return;
    };
    // Boxed, like the rest of what the task holds for its life: its future stays small.
    let mut endpoints = Box::new(EndpointStream::new(endpoint_pushes, capable));
    // The stream lives no longer than the certificate that authenticated it: the proxy
    // reconnects with its renewed one.
    let cert_expired = async {
        match cert_expiry {
            Some(at) => {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(cert_expired);
    let _connection = Connection {
        cp: Arc::clone(&cp),
        id: node.id.clone(),
        session,
    };
    tracing::info!(proxy = %node.id, service = %node.service, namespace = %node.namespace, inbound = %node.inbound_address, held = held.len(), "proxy connected");
    cp.update_status(&node.id, session, &held, None);

    let mut generations = cp.subscribe();
    let scope = crate::compile::scope_of(&node);
    let mut scope_changes = cp.subscribe_scope(&scope);
    let push_timeout = cp.push_timeout();
    let mut outstanding: Option<Pending> = None;
    let mut rejected: Option<Rejected> = None;
    // The generation last compiled for this proxy; `None` until the first compile.
    let mut compiled: Option<u64> = None;
    let mut dirty = Unpushed::new(&cp);
    // The generation of the first wake since the last compile (convergence start).
    let mut woken_by: Option<u64> = None;
    let debounce = cp.push_debounce();
    loop {
        if dirty.is_set() && outstanding.is_none() {
            // A burst of changes (proxies connecting together, a rollout) becomes one push:
            // wait a moment for the rest of it before compiling.
            if compiled.is_some() && !debounce.is_zero() {
                Box::pin(tokio::time::sleep(debounce)).await;
            }
            dirty.clear();
            // Seen before compiling: a change from now on wakes the stream again.
            generations.borrow_and_update();
            scope_changes.borrow_and_update();
            let generation = cp.generation();
            if rejected
                .as_ref()
                .is_some_and(|r| r.generation != generation)
            {
                rejected = None;
            }
            // Streams are woken per scope, so a later generation is not necessarily a change of
            // this proxy's: convergence runs from the change that woke it.
            let woken = woken_by.take();
            let changed_at = match compiled {
                None => connected_at,
                Some(_) => woken
                    .and_then(|g| cp.first_change_after(g.saturating_sub(1)))
                    .unwrap_or_else(Instant::now),
            };
            let first = compiled.is_none();
            compiled = Some(generation);
            let (response, raced) = compose(
                &cp,
                &node,
                &held,
                rejected.as_ref(),
                generation,
                changed_at,
                &mut endpoints,
            );
            if raced {
                // A policy change raced this compilation: compile again under the new set.
                woken_by.get_or_insert(cp.generation());
                dirty.set();
            }
            if first && !held.is_empty() {
                // A resumed stream (the proxy reconnected, maybe from another replica): only
                // what differs from what it holds goes out, often nothing at all.
                tracing::info!(
                    proxy = %node.id,
                    held = held.len(),
                    pushing = ?response.as_ref().map(|(_, p)| type_names(&p.versions)).unwrap_or_default(),
                    "proxy resumed with the versions it holds"
                );
            }
            if let Some((response, pending)) = response {
                tracing::debug!(proxy = %node.id, nonce = %pending.nonce, types = ?pending.versions, "push");
                if !send_item(&tx, response).await {
                    break;
                }
                outstanding = Some(pending);
            }
        }
        let deadline = outstanding
            .as_ref()
            .map(|p| tokio::time::Instant::from_std(p.sent_at + push_timeout));
        tokio::select! {
            () = &mut cert_expired => {
                tracing::info!(proxy = %node.id, "the client certificate of this stream expired: ending it");
                send(
                    &tx,
                    Err(Status::unauthenticated(
                        "the client certificate expired: reconnect with the renewed one",
                    )),
                )
                .await;
                break;
            }
            () = sleep_until_or_never(deadline) => {
                if let Some(p) = outstanding.take() {
                    tracing::warn!(
                        proxy = %node.id,
                        nonce = %p.nonce,
                        types = ?type_names(&p.versions),
                        timeout = ?push_timeout,
                        "push unanswered: considered lost; the next change pushes again"
                    );
                    record_answer(&cp, &p, "timeout");
                    endpoints.lost();
                }
            }
            changed = generations.changed() => {
                if changed.is_err() {
                    break;
                }
                woken_by.get_or_insert(*generations.borrow());
                dirty.set();
            }
            changed = scope_changes.changed() => {
                if changed.is_err() {
                    // Never while the stream watches it; resubscribe all the same.
                    scope_changes = cp.subscribe_scope(&scope);
                }
                woken_by.get_or_insert(*scope_changes.borrow());
                dirty.set();
            }
            message = inbound.next() => match message {
                Some(Ok(DiscoveryRequest { kind: Some(Kind::Ack(ack)) })) => {
                    let matches = outstanding.as_ref().is_some_and(|p| p.nonce == ack.nonce);
                    let reported = versions_map(&ack.versions);
                    if matches {
                        if let Some(p) = outstanding.take() {
                            record_answer(&cp, &p, "ack");
                            endpoints.acked(&p.nonce);
                            // The ACK covers every set of the push; versions the proxy reports
                            // override them (a proxy that does not list a type it was sent,
                            // say an older one unaware of it, is not re-sent it forever).
                            held.extend(p.versions);
                        }
                    } else {
                        tracing::debug!(proxy = %node.id, nonce = %ack.nonce, "stale ack");
                    }
                    held.extend(reported);
                    cp.update_status(&node.id, session, &held, None);
                }
                Some(Ok(DiscoveryRequest { kind: Some(Kind::Nack(nack)) })) => {
                    tracing::warn!(proxy = %node.id, nonce = %nack.nonce, error = %nack.error, "proxy rejected config");
                    // Whatever was NACKed, the next ENDPOINTS push is whole.
                    let was_delta = endpoints.nacked(&nack.nonce);
                    if outstanding.as_ref().is_some_and(|p| p.nonce == nack.nonce) {
                        if let Some(p) = outstanding.take() {
                            record_answer(&cp, &p, "nack");
                            if was_delta {
                                // The proxy may just not hold the delta's base: push again at
                                // once, the whole set (rejected for good only if that fails).
                                tracing::info!(proxy = %node.id, nonce = %nack.nonce, "endpoint delta rejected: pushing the whole set");
                                woken_by.get_or_insert(p.generation);
                                dirty.set();
                            } else {
                                let listed = versions_map(&nack.rejected);
                                rejected = Some(Rejected {
                                    generation: p.generation,
                                    versions: if listed.is_empty() { p.versions } else { listed },
                                });
                            }
                        }
                    }
                    cp.update_status(&node.id, session, &held, Some(bounded(nack.error)));
                }
                Some(Ok(DiscoveryRequest { kind: Some(Kind::Hello(_)) })) => {
                    send(&tx, Err(Status::invalid_argument("Hello may only be sent once per stream"))).await;
                    break;
                }
                Some(Ok(DiscoveryRequest { kind: None })) => {}
                Some(Err(status)) => {
                    tracing::debug!(proxy = %node.id, error = %status, "stream error");
                    break;
                }
                None => break,
            },
        }
    }
}

/// A NACK reason is kept for `weftctl status`: at most [`MAX_NACK_REASON`] bytes of it.
fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_NACK_REASON {
        let mut cut = MAX_NACK_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    reason
}

/// Longest NACK reason kept per proxy.
const MAX_NACK_REASON: usize = 4096;

/// Whether a stream has a change it has not pushed yet, counted in
/// `weft_control_pushes_pending` (the push queue) while set.
struct Unpushed {
    gauge: prometheus::IntGauge,
    set: bool,
}

impl Unpushed {
    /// Set: a new stream has its first push to make.
    fn new(cp: &ControlPlane) -> Self {
        let gauge = cp.metrics().pushes_pending.clone();
        gauge.inc();
        Self { gauge, set: true }
    }

    fn is_set(&self) -> bool {
        self.set
    }

    fn set(&mut self) {
        if !self.set {
            self.set = true;
            self.gauge.inc();
        }
    }

    fn clear(&mut self) {
        if self.set {
            self.set = false;
            self.gauge.dec();
        }
    }
}

impl Drop for Unpushed {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Sleeps until `deadline`, or forever without one (a disabled `select!` branch).
async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn type_names(versions: &HashMap<i32, String>) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = versions
        .keys()
        .filter_map(|t| ResourceType::try_from(*t).ok())
        .map(type_name)
        .collect();
    names.sort_unstable();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::v1::{ClusterSet, EndpointSet, ListenerSet, PolicySet, RouteSet, TrustSet};

    fn resources(l: &str, r: &str, c: &str, e: &str) -> Resources {
        Resources {
            listeners: ListenerSet {
                version: l.into(),
                ..Default::default()
            },
            routes: RouteSet {
                version: r.into(),
                ..Default::default()
            },
            clusters: ClusterSet {
                version: c.into(),
                ..Default::default()
            },
            endpoints: EndpointSet {
                version: e.into(),
                ..Default::default()
            },
            policies: PolicySet {
                version: "p1".into(),
                ..Default::default()
            },
            trust: TrustSet {
                version: "t1".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn sends_only_types_not_held() {
        let held: HashMap<i32, String> = [
            (ResourceType::Listeners as i32, "l1".to_owned()),
            (ResourceType::Routes as i32, "r1".to_owned()),
            (ResourceType::Trust as i32, "t1".to_owned()),
        ]
        .into();
        let (resp, pending) = build_response(
            resources("l1", "r1", "c1", "e1"),
            &held,
            None,
            0,
            Instant::now(),
        )
        .unwrap();
        assert!(resp.listeners.is_none() && resp.routes.is_none());
        assert!(resp.clusters.is_some() && resp.endpoints.is_some());
        assert!(resp.policies.is_some() && resp.trust.is_none());
        assert_eq!(pending.versions.len(), 3);
        assert!(!resp.nonce.is_empty());
        assert!(build_response(
            resources("l1", "r1", "c1", "e1"),
            &[
                (1, "l1".into()),
                (2, "r1".into()),
                (3, "c1".into()),
                (4, "e1".into()),
                (5, "p1".into()),
                (6, "t1".into())
            ]
            .into(),
            None,
            0,
            Instant::now()
        )
        .is_none());
    }

    #[test]
    fn a_resumed_stream_gets_only_what_changed_or_nothing() {
        // The Hello of a proxy that moved from another replica: every version it holds.
        let hello = [
            TypeVersion {
                r#type: ResourceType::Listeners as i32,
                version: "l1".into(),
            },
            TypeVersion {
                r#type: ResourceType::Routes as i32,
                version: "r1".into(),
            },
            TypeVersion {
                r#type: ResourceType::Clusters as i32,
                version: "c1".into(),
            },
            TypeVersion {
                r#type: ResourceType::Endpoints as i32,
                version: "e1".into(),
            },
            TypeVersion {
                r#type: ResourceType::Policies as i32,
                version: "p1".into(),
            },
            TypeVersion {
                r#type: ResourceType::Trust as i32,
                version: "t1".into(),
            },
            TypeVersion {
                r#type: ResourceType::Unspecified as i32,
                version: "ignored".into(),
            },
        ];
        let held = versions_map(&hello);
        assert_eq!(held.len(), 6);
        assert!(build_response(
            resources("l1", "r1", "c1", "e1"),
            &held,
            None,
            0,
            Instant::now()
        )
        .is_none());
        // Endpoints moved meanwhile: only they go out.
        let (resp, pending) = build_response(
            resources("l1", "r1", "c1", "e2"),
            &held,
            None,
            0,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(type_names(&pending.versions), ["endpoints"]);
        assert!(resp.endpoints.is_some() && resp.listeners.is_none() && resp.trust.is_none());
    }

    /// The future a connected proxy's stream task holds for its whole life: tokio allocates a
    /// task for its largest state, so what is rarely live (the Hello and its deadline, the
    /// debounce, the sends) is boxed out of it. 3,000 bytes in a debug build before that,
    /// 2,432 after (benches/RESULTS.md, "Memory per connected proxy"): the bound catches
    /// something large creeping back in.
    #[tokio::test]
    async fn the_stream_task_future_stays_small() {
        use tonic::codec::Codec;
        let dir = tempfile::tempdir().unwrap();
        let cp = Arc::new(ControlPlane::new(
            Arc::new(crate::store::FileStore::in_dir(dir.path())),
            Duration::from_secs(5),
            crate::metrics::Metrics::new().unwrap(),
        ));
        let mut codec =
            weft_proto::codec::LeanCodec::<DiscoveryResponse, DiscoveryRequest>::default();
        let inbound =
            Streaming::new_request(codec.decoder(), tonic::body::Body::empty(), None, None);
        let (tx, _rx) = mpsc::channel::<PushItem>(1);
        let admission = Admission {
            caller: Caller::Unverified,
            peer: None,
            cert_expiry: None,
        };
        let pushes = EndpointPushes::register(cp.metrics());
        let future = run_stream(cp, admission, inbound, tx, pushes);
        let size = std::mem::size_of_val(&future);
        println!(
            "run_stream future: {size} bytes (tokio Sleep: {} bytes)",
            std::mem::size_of::<tokio::time::Sleep>()
        );
        assert!(
            size <= 2560,
            "the stream task's future is {size} bytes: box what is rarely live"
        );
    }

    #[test]
    fn rejected_versions_are_skipped() {
        let rejected = Rejected {
            generation: 3,
            versions: [(ResourceType::Routes as i32, "r2".to_owned())].into(),
        };
        let (resp, _) = build_response(
            resources("l1", "r2", "c1", "e2"),
            &HashMap::new(),
            Some(&rejected),
            3,
            Instant::now(),
        )
        .unwrap();
        assert!(resp.routes.is_none());
        assert!(resp.endpoints.is_some());
    }
}
