//! Endpoint deltas between a real weft-control and real weft-proxy sidecars whose scope holds
//! hundreds of services: a registration change reaches the sidecar as only the changed cluster
//! (`weft_control_endpoint_pushes_total{kind="delta"}`, a few hundred bytes against a whole set
//! of tens of KiB in `weft_config_received_bytes_total`), the merged set equals what a fresh
//! sidecar gets whole, requests reach the new endpoint, and after a control-plane restart that
//! changed endpoints while it was down the sidecar converges with a whole set, then gets deltas
//! again.

use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use weft_e2e::{caller_proxy, tally, wait_for_instance, Instance};
use weft_proto::v1;
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::discovery_request::Kind;
use weft_testkit::{
    wait_until, ControlPlane, ControlPlaneConfig, Metrics, PolicyDir, Proxy, DEFAULT_WAIT,
};

/// Services in every sidecar's scope besides `web` and `api` (no `dependencies:`: each may call
/// all of them), three static endpoints each.
const SERVICES: usize = 300;

/// Instances registered and deregistered one after the other.
const ROUNDS: usize = 4;

/// The policy: `web`, `api` (its instances register) and [`SERVICES`] static services; the
/// first static service's first endpoint is `changed`.
fn mesh_yaml(changed: &str) -> String {
    let mut y = String::from("services:\n  - name: web\n  - name: api\n");
    for i in 0..SERVICES {
        y.push_str(&format!("  - name: svc-{i}\n    endpoints:\n"));
        for j in 1..=3 {
            let addr = if i == 0 && j == 1 {
                changed.to_owned()
            } else {
                format!("10.77.{}.{}:80", i / 200, (i % 200) + j)
            };
            y.push_str(&format!("      - address: {addr}\n"));
        }
    }
    y
}

const RECEIVED: &str = "weft_config_received_bytes_total";
const UPDATES: &str = "weft_config_updates_total";
const PUSHES: &str = "weft_control_endpoint_pushes_total";

fn endpoint_acks(m: &Metrics) -> f64 {
    m.sum(UPDATES, &[("type", "endpoints"), ("result", "ack")])
}

/// A sidecar's endpoints from `/config_dump`, without its own `inbound` cluster (each sidecar's
/// points at its own app).
async fn mesh_endpoints(p: &Proxy) -> Vec<serde_json::Value> {
    p.config_dump().await["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: /config_dump endpoints is not a list", p.id()))
        .iter()
        .filter(|c| c["cluster"] != "inbound")
        .cloned()
        .collect()
}

/// The encoded size of the whole endpoint set `/config_dump` shows (identities aside): what a
/// state-of-the-world push of it costs.
async fn whole_set_bytes(p: &Proxy) -> usize {
    let dump = p.config_dump().await;
    let clusters = dump["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("no endpoints in {dump}"))
        .iter()
        .map(|c| v1::ClusterEndpoints {
            cluster: c["cluster"].as_str().unwrap_or_default().to_owned(),
            endpoints: c["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| v1::Endpoint {
                    address: e["address"].as_str().unwrap_or_default().to_owned(),
                    weight: u32::try_from(e["weight"].as_u64().unwrap_or_default()).unwrap_or(0),
                    proxy_id: e["proxy_id"].as_str().unwrap_or_default().to_owned(),
                    ..Default::default()
                })
                .collect(),
        })
        .collect();
    v1::EndpointSet {
        version: dump["versions"]["endpoints"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        clusters,
    }
    .encoded_len()
}

/// Waits until `a` and `b` hold the same mesh endpoints (in the same order).
async fn wait_same_endpoints(a: &Proxy, b: &Proxy) {
    let what = format!("{} and {} hold the same endpoints", a.id(), b.id());
    wait_until(DEFAULT_WAIT, &what, async || {
        let (x, y) = (mesh_endpoints(a).await, mesh_endpoints(b).await);
        if x == y {
            Ok(())
        } else {
            let differ: Vec<String> = x
                .iter()
                .zip(&y)
                .filter(|(p, q)| p != q)
                .take(3)
                .map(|(p, q)| format!("{p} vs {q}"))
                .collect();
            Err(format!(
                "{} vs {} clusters; first differences: {differ:?}",
                x.len(),
                y.len()
            ))
        }
    })
    .await;
}

async fn wait_routed_to(web: &Proxy, instance: &str) {
    let client = web.http1();
    let what = format!("requests for api through {} reach {instance}", web.id());
    wait_until(DEFAULT_WAIT, &what, async || {
        let t = tally(&client, "api", "/", 20).await;
        if t.count(instance) > 0 && t.errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_go_as_deltas_and_a_restart_resyncs_whole() {
    let policies = PolicyDir::with_file("mesh.yaml", &mesh_yaml("10.99.0.1:80"));
    let cp = ControlPlane::start(policies.path()).await;
    let _api1 = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
    let whole = whole_set_bytes(&web).await;
    assert!(
        whole > 20_000,
        "{SERVICES} services make a whole endpoint set of {whole} bytes: too small to tell"
    );

    // Register and deregister an instance, round after round: each change reaches `web`.
    let start = web.metrics().await;
    for round in 0..ROUNDS {
        let id = format!("api-{}", round + 2);
        let instance = Instance::http(&cp, "api", &id).await;
        web.wait_endpoint(instance.endpoint(), true).await;
        wait_routed_to(&web, &id).await;
        let gone = instance.endpoint();
        drop(instance);
        web.wait_endpoint(gone, false).await;
    }
    let end = web.metrics().await;
    let pushes = endpoint_acks(&end) - endpoint_acks(&start);
    let bytes = end.sum(RECEIVED, &[]) - start.sum(RECEIVED, &[]);
    assert!(
        pushes >= (2 * ROUNDS) as f64,
        "{} ACKed {pushes} endpoint pushes for {} changes",
        web.id(),
        2 * ROUNDS
    );
    let per_push = bytes / pushes;
    assert!(
        per_push * 20.0 < whole as f64,
        "{} received {bytes} bytes in {pushes} endpoint pushes ({per_push:.0} each): \
         not far below the whole set's {whole} bytes",
        web.id()
    );
    let m = cp.metrics().await;
    let (delta, full) = (
        m.sum(PUSHES, &[("kind", "delta")]),
        m.sum(PUSHES, &[("kind", "full")]),
    );
    println!(
        "whole endpoint set {whole} bytes; {} got {pushes} endpoint pushes, {per_push:.0} bytes \
         each; the control plane pushed {delta} deltas and {full} whole sets",
        web.id()
    );
    assert!(
        delta >= (2 * ROUNDS) as f64,
        "{delta} delta pushes for {} changes to web-1 alone:\n{}",
        2 * ROUNDS,
        m.lines_for(PUSHES)
    );
    // One whole set per stream (api-1, web-1, each round's instance), none for a change.
    assert!(
        full <= (2 + ROUNDS) as f64,
        "whole sets pushed for endpoint changes:\n{}",
        m.lines_for(PUSHES)
    );
    assert_eq!(
        end.sum(UPDATES, &[("type", "endpoints"), ("result", "nack")]),
        0.0,
        "{} NACKed an endpoint push:\n{}",
        web.id(),
        end.lines_for(UPDATES)
    );

    // The merged set is what a sidecar that starts now is pushed whole.
    let web2 = caller_proxy(&cp, "web", "web-2").await;
    wait_same_endpoints(&web, &web2).await;

    // The control plane restarts with an endpoint changed while it was down: the sidecars
    // resume holding a set the new process never sent them, so they get the whole set.
    let before = [
        web.metrics().await.sum(RECEIVED, &[]),
        web2.metrics().await.sum(RECEIVED, &[]),
    ];
    let config = cp.config.clone();
    drop(cp);
    policies.write("mesh.yaml", &mesh_yaml("10.99.0.2:80"));
    let cp = ControlPlane::start_with(config).await;
    let moved: std::net::SocketAddr = "10.99.0.2:80".parse().unwrap_or_else(|e| panic!("{e}"));
    web.wait_endpoint(moved, true).await;
    web2.wait_endpoint(moved, true).await;
    wait_same_endpoints(&web, &web2).await;
    let m = cp.metrics().await;
    assert!(
        m.sum(PUSHES, &[("kind", "full")]) >= 2.0,
        "both sidecars resync whole after the restart:\n{}",
        m.lines_for(PUSHES)
    );
    for (p, before) in [&web, &web2].into_iter().zip(before) {
        let got = p.metrics().await.sum(RECEIVED, &[]) - before;
        assert!(
            got >= 0.9 * whole as f64,
            "{} resynced with {got} bytes: not a whole set ({whole} bytes)",
            p.id()
        );
    }

    // Then deltas again, and requests still reach a new instance.
    let deltas = m.sum(PUSHES, &[("kind", "delta")]);
    let acks = endpoint_acks(&web.metrics().await);
    let late = Instance::http(&cp, "api", "api-late").await;
    web.wait_endpoint(late.endpoint(), true).await;
    wait_routed_to(&web, "api-late").await;
    wait_same_endpoints(&web, &web2).await;
    let m = cp.metrics().await;
    assert!(
        m.sum(PUSHES, &[("kind", "delta")]) >= deltas + 2.0,
        "the change after the resync goes to both sidecars as a delta:\n{}",
        m.lines_for(PUSHES)
    );
    assert!(endpoint_acks(&web.metrics().await) > acks);
}

/// A proxy speaking the discovery protocol by hand to a real weft-control (plaintext gRPC).
struct ScriptedProxy {
    tx: mpsc::Sender<v1::DiscoveryRequest>,
    rx: tonic::Streaming<v1::DiscoveryResponse>,
    held: Vec<v1::TypeVersion>,
}

impl ScriptedProxy {
    async fn connect(cp: &ControlPlane, id: &str, capabilities: &[&str]) -> ScriptedProxy {
        let url = cp.grpc_url();
        let mut client = DiscoveryClient::connect(url.clone())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(8);
        let ip = weft_testkit::next_loopback_ip();
        let node = v1::Node {
            id: id.into(),
            service: "web".into(),
            namespace: "default".into(),
            inbound_address: format!("{ip}:15006"),
            outbound_address: format!("{ip}:15001"),
            app_address: format!("{ip}:8080"),
            tcp_bind_ip: ip.to_string(),
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
            ..Default::default()
        };
        tx.send(v1::DiscoveryRequest {
            kind: Some(Kind::Hello(v1::Hello {
                node: Some(node),
                held: vec![],
            })),
        })
        .await
        .unwrap_or_else(|e| panic!("sending the Hello: {e}"));
        let rx = client
            .stream(tokio_stream_of(rx))
            .await
            .unwrap_or_else(|e| panic!("opening the discovery stream: {e}"))
            .into_inner();
        ScriptedProxy {
            tx,
            rx,
            held: Vec::new(),
        }
    }

    async fn next(&mut self, what: &str) -> v1::DiscoveryResponse {
        tokio::time::timeout(DEFAULT_WAIT, self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("no discovery response within {DEFAULT_WAIT:?}: {what}"))
            .unwrap_or_else(|e| panic!("discovery stream failed ({what}): {e}"))
            .unwrap_or_else(|| panic!("discovery stream ended ({what})"))
    }

    /// The endpoints version a response carries, whole or as a delta.
    fn endpoints_version(r: &v1::DiscoveryResponse) -> Option<String> {
        r.endpoints
            .as_ref()
            .map(|s| s.version.clone())
            .or_else(|| r.endpoint_delta.as_ref().map(|d| d.version.clone()))
    }

    async fn ack(&mut self, r: &v1::DiscoveryResponse) {
        let carried = [
            (
                v1::ResourceType::Listeners,
                r.listeners.as_ref().map(|s| s.version.clone()),
            ),
            (
                v1::ResourceType::Routes,
                r.routes.as_ref().map(|s| s.version.clone()),
            ),
            (
                v1::ResourceType::Clusters,
                r.clusters.as_ref().map(|s| s.version.clone()),
            ),
            (v1::ResourceType::Endpoints, Self::endpoints_version(r)),
            (
                v1::ResourceType::Policies,
                r.policies.as_ref().map(|s| s.version.clone()),
            ),
            (
                v1::ResourceType::Trust,
                r.trust.as_ref().map(|s| s.version.clone()),
            ),
        ];
        for (t, v) in carried {
            if let Some(version) = v {
                self.held.retain(|h| h.r#type != t as i32);
                self.held.push(v1::TypeVersion {
                    r#type: t as i32,
                    version,
                });
            }
        }
        self.send(Kind::Ack(v1::Ack {
            nonce: r.nonce.clone(),
            versions: self.held.clone(),
        }))
        .await;
    }

    async fn nack(&mut self, r: &v1::DiscoveryResponse, error: &str) {
        self.send(Kind::Nack(v1::Nack {
            nonce: r.nonce.clone(),
            error: error.into(),
            rejected: vec![],
        }))
        .await;
    }

    async fn send(&self, kind: Kind) {
        self.tx
            .send(v1::DiscoveryRequest { kind: Some(kind) })
            .await
            .unwrap_or_else(|e| panic!("sending on the discovery stream: {e}"));
    }

    /// ACKs whatever arrives until nothing has for a moment (the other proxy's registration
    /// changes this one's endpoints too).
    async fn settle(&mut self) {
        for _ in 0..20 {
            match tokio::time::timeout(Duration::from_millis(700), self.rx.message()).await {
                Err(_) => return,
                Ok(m) => {
                    let r = m
                        .unwrap_or_else(|e| panic!("discovery stream failed: {e}"))
                        .unwrap_or_else(|| panic!("discovery stream ended"));
                    self.ack(&r).await;
                }
            }
        }
        panic!("pushes kept coming with nothing changing");
    }

    /// Asserts nothing arrives for a moment (the control plane has nothing more to push).
    async fn assert_silent(&mut self, what: &str) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), self.rx.message()).await {
            panic!("{what}: unexpected message {m:?}");
        }
    }
}

/// The request stream of a discovery call, from a channel.
fn tokio_stream_of(
    rx: mpsc::Receiver<v1::DiscoveryRequest>,
) -> impl futures::Stream<Item = v1::DiscoveryRequest> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_delta_is_followed_by_the_whole_set_and_old_proxies_get_whole_sets() {
    let policies = PolicyDir::with_file("mesh.yaml", &mesh_yaml("10.99.0.1:80"));
    let mut config = ControlPlaneConfig::new(policies.path());
    config.grpc_tls = false;
    let cp = ControlPlane::start_with(config).await;
    let mut new = ScriptedProxy::connect(&cp, "web-new", &["endpoint-delta"]).await;
    let mut old = ScriptedProxy::connect(&cp, "web-old", &[]).await;
    for p in [&mut new, &mut old] {
        let first = p.next("the first push").await;
        assert!(
            first.endpoints.is_some() && first.endpoint_delta.is_none(),
            "the first push carries the whole endpoint set"
        );
        p.ack(&first).await;
    }
    for p in [&mut new, &mut old] {
        p.settle().await;
    }
    let m = cp.metrics().await;
    let (full0, delta0) = (
        m.sum(PUSHES, &[("kind", "full")]),
        m.sum(PUSHES, &[("kind", "delta")]),
    );

    // An endpoint changes: a delta to the proxy that advertises the capability, naming only
    // the changed cluster against the version it ACKed.
    policies.write("mesh.yaml", &mesh_yaml("10.99.0.2:80"));
    let acked = new
        .held
        .iter()
        .find(|h| h.r#type == v1::ResourceType::Endpoints as i32)
        .map(|h| h.version.clone());
    let push = new.next("the push of the changed endpoint").await;
    let delta = push
        .endpoint_delta
        .as_ref()
        .unwrap_or_else(|| panic!("not a delta: {push:?}"));
    assert!(push.endpoints.is_none());
    assert_eq!(Some(delta.base_version.clone()), acked);
    assert_eq!(
        delta
            .clusters
            .iter()
            .map(|c| c.cluster.as_str())
            .collect::<Vec<_>>(),
        ["svc-0.default"],
        "only the changed cluster"
    );
    assert!(delta
        .clusters
        .iter()
        .flat_map(|c| &c.endpoints)
        .any(|e| e.address == "10.99.0.2:80"));
    // The proxy without the capability gets the change in a whole set.
    let whole = old.next("the old proxy's push").await;
    assert!(whole.endpoint_delta.is_none());
    let set = whole
        .endpoints
        .as_ref()
        .unwrap_or_else(|| panic!("no endpoints: {whole:?}"));
    assert!(set.clusters.len() > SERVICES, "a whole set");
    assert!(set
        .clusters
        .iter()
        .flat_map(|c| &c.endpoints)
        .any(|e| e.address == "10.99.0.2:80"));
    old.ack(&whole).await;

    // The proxy rejects the delta (as one that does not hold its base does): the whole set of
    // that version follows at once, with no other change.
    let version = delta.version.clone();
    new.nack(
        &push,
        "endpoint delta is against endpoints x, but this proxy holds y",
    )
    .await;
    let resent = new.next("the whole set after the NACKed delta").await;
    assert!(
        resent.endpoint_delta.is_none(),
        "after a NACK the set goes whole: {resent:?}"
    );
    assert_eq!(
        resent.endpoints.as_ref().map(|s| &s.version),
        Some(&version)
    );
    new.ack(&resent).await;
    new.assert_silent("after the ACK of the whole set").await;

    // Deltas again from there; the old proxy keeps getting whole sets.
    policies.write("mesh.yaml", &mesh_yaml("10.99.0.3:80"));
    let push = new.next("the next change").await;
    let d = push
        .endpoint_delta
        .as_ref()
        .unwrap_or_else(|| panic!("not a delta after the ACKed whole set: {push:?}"));
    assert_eq!(Some(&d.base_version), Some(&version));
    new.ack(&push).await;
    let whole = old.next("the old proxy's next push").await;
    assert!(whole.endpoints.is_some() && whole.endpoint_delta.is_none());
    old.ack(&whole).await;

    let m = cp.metrics().await;
    // Since the proxies settled: whole sets for the old proxy's two changes and the resend
    // after the NACK; deltas for the new proxy's two changes.
    assert_eq!(
        m.sum(PUSHES, &[("kind", "full")]) - full0,
        3.0,
        "{}",
        m.lines_for(PUSHES)
    );
    assert_eq!(
        m.sum(PUSHES, &[("kind", "delta")]) - delta0,
        2.0,
        "{}",
        m.lines_for(PUSHES)
    );
}
