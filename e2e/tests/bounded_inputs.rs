//! Bounded inputs of the control plane, with real processes on loopback: every bound from the
//! policy-input and server-cap change holds against hostile input, and holding it disturbs
//! nothing that already works.
//!
//! - Policy input: an alias bomb (42 KB of YAML expanding to 2x10^8 nodes) is refused by the
//!   admin API (422 naming the file and the YAML node budget) and, written to the watched
//!   directory, reported (`weft_control_policy_errors`) while the last good set keeps serving; a
//!   file over 4 MiB and a request body over 16 MiB are refused; the control plane stays healthy.
//! - gRPC: `--grpc-max-connections` closes a flood of connections at accept (counted by
//!   `weft_control_connections_refused_total{server="grpc"}`) without dropping a registered
//!   proxy, and frees its slots so a new proxy registers afterwards; `--hello-timeout` ends
//!   discovery streams that never say Hello (`DEADLINE_EXCEEDED`, counted as `hello_timeout`),
//!   and `--grpc-max-streams` makes the client queue streams past the cap on one connection;
//!   `--max-registrations-per-service` refuses one registration too many (`RESOURCE_EXHAUSTED`,
//!   `too_many`) while callers keep seeing exactly the registered endpoints.
//! - Admin API: `--admin-max-connections` closes connections past the cap at accept (counted by
//!   `weft_control_connections_refused_total{server="admin"}`) and recovers once they are gone;
//!   a client that sends half a request head is disconnected by the header-read timeout.
//!
//! No assertion is a performance threshold: "quickly" means within a generous deadline (several
//! times the configured timeout, and shorter than the default, so an ignored flag fails). The
//! one lower bound is causal: a stream queued behind the stream cap cannot end before two Hello
//! deadlines have passed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;
use weft_e2e::{
    caller_proxy, http_services_yaml, proxy_status, tally, wait_for_instance, Instance, SETTLE,
};
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::{DiscoveryRequest, Node};
use weft_testkit::security::{certify_with_openssl, control_channel_as, try_register_node};
use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, ControlPlaneConfig, HttpClient,
    HttpResponse, Metrics, PolicyDir, DEFAULT_WAIT,
};

const CONNECTIONS_REFUSED: &str = "weft_control_connections_refused_total";
const REGISTRATIONS_REFUSED: &str = "weft_control_registrations_refused_total";
const POLICY_ERRORS: &str = "weft_control_policy_errors";

/// How long opening one raw TCP connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most time a batch of raw connections may take to open, all together.
const FLOOD_BUDGET: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A control plane serving `web` and `api` with `extra_args`.
async fn control_plane(policies: &PolicyDir, extra_args: &[&str]) -> ControlPlane {
    ControlPlane::start_with(ControlPlaneConfig {
        extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
        ..ControlPlaneConfig::new(policies.path())
    })
    .await
}

fn mesh_policies() -> PolicyDir {
    PolicyDir::with_file("00-mesh.yaml", &http_services_yaml(&["web", "api"]))
}

/// The alias bomb of `policy::bounds`' unit test: a base list of `base` scalars, then `levels`
/// levels of `width` aliases of the level below: `base * width^levels` nodes once expanded.
fn alias_bomb(base: usize, levels: usize, width: usize) -> String {
    let mut text = format!("a0: &a0 [{}]\n", vec!["x"; base].join(","));
    for level in 1..=levels {
        let refs = vec![format!("*a{}", level - 1); width].join(",");
        text.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
    }
    text
}

/// `method <admin><path>` with the bootstrap credential; transport errors are returned, not
/// panicked on (a capped server may close the connection).
async fn try_admin(
    cp: &ControlPlane,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> anyhow::Result<HttpResponse> {
    cp.admin().request(method, path, body).await
}

/// The served policy version (`GET /v1/policies` `version`).
async fn policy_version(cp: &ControlPlane) -> serde_json::Value {
    let v = cp.policies().await["version"].clone();
    assert!(v.is_string(), "GET /v1/policies has a version: {v}");
    v
}

/// `GET /healthz` answers 200 `ok`.
async fn assert_healthy(cp: &ControlPlane, when: &str) {
    let r = cp.get("/healthz").await;
    assert_eq!(
        r.status.as_u16(),
        200,
        "{when}: GET /healthz: {}\n{}",
        r.summary(),
        cp.process.describe()
    );
}

/// `n` requests from `client` (web's outbound listener) to `api` all get 200 from one of
/// `instances`.
async fn assert_serves(client: &HttpClient, n: usize, instances: &[&str], when: &str) {
    let t = tally(client, "api", "/", n).await;
    let answered: usize = instances.iter().map(|i| t.count(i)).sum();
    assert!(
        t.errors.is_empty() && answered == n,
        "{when}: web -> api must keep working, answered only by {instances:?}: {t:?}"
    );
}

/// Waits until `weft_control_policy_errors` is `want`.
async fn wait_policy_errors(cp: &ControlPlane, want: f64) {
    let what = format!("{POLICY_ERRORS} is {want}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let m = cp.metrics().await;
        match m.get(POLICY_ERRORS, &[]) {
            Some(v) if v == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Waits until `name{labels}` on the control plane is at least `min`; returns the value.
async fn wait_cp_metric_at_least(
    cp: &ControlPlane,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
) -> f64 {
    let what = format!("{name}{labels:?} >= {min}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let m = cp.metrics().await;
        let v = m.sum(name, labels);
        if v >= min {
            Ok(v)
        } else {
            Err(format!("{v}; {}", m.lines_for(name)))
        }
    })
    .await
}

/// `GET /metrics` over a connection that may be refused while a connection cap is reached:
/// retried until it answers within [`DEFAULT_WAIT`].
async fn metrics_when_admitted(cp: &ControlPlane) -> Metrics {
    wait_until(
        DEFAULT_WAIT,
        "GET /metrics on weft-control answers 200 (an admin connection is admitted)",
        async || match try_admin(cp, Method::GET, "/metrics", Bytes::new()).await {
            Ok(r) if r.status.as_u16() == 200 => Ok(Metrics::parse(&r.text())),
            Ok(r) => Err(r.summary()),
            Err(e) => Err(format!("{e:#}")),
        },
    )
    .await
}

/// The `GET /v1/proxies` entry of `id`, which must be listed and connected.
async fn connected_entry(cp: &ControlPlane, id: &str) -> serde_json::Value {
    let Some(entry) = proxy_status(cp, id).await else {
        panic!("GET /v1/proxies lists {id}: {}", cp.proxies().await)
    };
    assert_eq!(
        entry["state"], "connected",
        "{id} is connected in GET /v1/proxies: {entry}"
    );
    entry
}

/// Opens up to `n` raw TCP connections to `addr` (each within [`CONNECT_TIMEOUT`], all within
/// [`FLOOD_BUDGET`]) and returns them, open.
async fn open_raw_connections(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        if started.elapsed() >= FLOOD_BUDGET {
            break;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => conns.push(s),
            Ok(Err(e)) => panic!("raw connection {i} to {addr}: {e}"),
            Err(_) => {
                panic!("raw connection {i} to {addr}: not connected within {CONNECT_TIMEOUT:?}")
            }
        }
    }
    assert_eq!(
        conns.len(),
        n,
        "opened only {} of {n} connections to {addr} within {FLOOD_BUDGET:?}",
        conns.len()
    );
    conns
}

/// How many of `conns` the server has closed (EOF or reset): each is given `wait`, all at
/// once, to show it. The connections stay open on this side.
async fn count_closed(conns: &mut [TcpStream], wait: Duration) -> usize {
    let reads = conns.iter_mut().map(|c| async move {
        let mut buf = [0u8; 64];
        // Otherwise the server stayed silent (or sent bytes, which it never should first).
        matches!(
            tokio::time::timeout(wait, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Policy input
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_bomb_is_refused_and_the_control_plane_stays_responsive() {
    let policies = mesh_policies();
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    wait_policy_errors(&cp, 0.0).await;
    let version = policy_version(&cp).await;

    // 20,000 x 100 x 100 = 2x10^8 nodes from ~42 KB.
    let bomb = alias_bomb(20_000, 2, 100);
    assert!(
        bomb.len() < 70_000,
        "the bomb is small: {} bytes",
        bomb.len()
    );

    // 1. Through the admin API, with health checks and traffic while it is handled.
    let put = {
        let admin = cp.admin();
        let bomb = Bytes::from(bomb.clone());
        tokio::spawn(async move {
            admin
                .request(Method::PUT, "/v1/policies/50-bomb.yaml", bomb)
                .await
        })
    };
    assert_healthy(&cp, "while the bomb is PUT").await;
    assert_serves(&client, 10, &["api-1"], "while the bomb is PUT").await;
    let resp = tokio::time::timeout(DEFAULT_WAIT, put)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "PUT of the alias bomb: no answer within {DEFAULT_WAIT:?}\n{}",
                cp.process.describe()
            )
        })
        .unwrap_or_else(|e| panic!("the PUT task failed: {e}"))
        .unwrap_or_else(|e| panic!("PUT of the alias bomb: {e:#}\n{}", cp.process.describe()));
    assert_eq!(
        resp.status.as_u16(),
        422,
        "the alias bomb must be refused with 422: {}",
        resp.summary()
    );
    let body = resp.json();
    let errors = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("a 422 carries {{\"errors\": [...]}}: {body}"));
    assert!(
        errors.iter().any(|e| {
            let e = e.as_str().unwrap_or_default();
            e.contains("50-bomb.yaml") && e.contains("YAML nodes")
        }),
        "an error names the file and the YAML node budget: {body}"
    );
    assert_healthy(&cp, "after the bomb was refused").await;
    assert_serves(&client, 10, &["api-1"], "after the bomb was refused").await;
    let after = cp.policies().await;
    assert_eq!(
        after["version"], version,
        "a refused PUT leaves the served version: {after}"
    );
    assert!(
        !after.to_string().contains("50-bomb.yaml"),
        "a refused PUT writes nothing to the store: {after}"
    );

    // 2. Written to the watched directory: reported, the last good set keeps serving.
    policies.write("50-bomb.yaml", &bomb);
    let err = wait_until(
        DEFAULT_WAIT,
        "GET /v1/policies reports the bomb file (50-bomb.yaml, YAML nodes)",
        async || {
            let p = cp.policies().await;
            match p["error"].as_str() {
                Some(e) if e.contains("50-bomb.yaml") && e.contains("YAML nodes") => {
                    Ok(e.to_owned())
                }
                _ => Err(format!("error = {}", p["error"])),
            }
        },
    )
    .await;
    wait_policy_errors(&cp, 1.0).await;
    assert_healthy(&cp, "with the bomb in the policy directory").await;
    assert_eq!(
        policy_version(&cp).await,
        version,
        "the served version stays while the directory holds the bomb ({err})"
    );
    tokio::time::sleep(SETTLE).await;
    assert_serves(
        &client,
        20,
        &["api-1"],
        "with the bomb in the policy directory",
    )
    .await;
    policies.remove("50-bomb.yaml");
    wait_policy_errors(&cp, 0.0).await;
    assert_eq!(
        policy_version(&cp).await,
        version,
        "removing the bad file leaves the same set served"
    );

    // 3. A file over the 4 MiB limit (valid YAML: comments), through the admin API.
    let line = "# padding padding padding padding padding padding padding padding\n";
    let big = line.repeat((5 << 20) / line.len() + 1);
    assert!(big.len() > 5 << 20);
    let resp = try_admin(&cp, Method::PUT, "/v1/policies/60-big.yaml", big)
        .await
        .unwrap_or_else(|e| panic!("PUT of a 5 MiB file: {e:#}\n{}", cp.process.describe()));
    assert!(
        resp.status.is_client_error(),
        "a 5 MiB policy file must be refused with a 4xx: {}",
        resp.summary()
    );
    eprintln!("a 5 MiB policy file: {}", resp.status);
    let text = resp.text();
    assert!(
        text.contains("60-big.yaml") && text.contains("4194304"),
        "the refusal names the file and the 4194304-byte limit: {}",
        resp.summary()
    );

    // 4. A request body over the 16 MiB limit: a batch of six files, each under the file limit
    //    (so only the request bound can refuse it), ~20 MiB of JSON in all. Validation only:
    //    nothing would be written even if it were accepted.
    let pad = "#".repeat(99) + "\n";
    let content = pad.repeat((3500 << 10) / pad.len());
    assert!(content.len() < 4 << 20, "each file is under the file limit");
    let files: Vec<serde_json::Value> = (0..6)
        .map(|i| serde_json::json!({"name": format!("70-pad-{i}.yaml"), "content": content}))
        .collect();
    let batch = serde_json::json!({ "files": files }).to_string();
    assert!(
        batch.len() > 20 << 20,
        "the batch is over 20 MiB: {}",
        batch.len()
    );
    let outcome = try_admin(&cp, Method::POST, "/v1/validate", batch).await;
    // Health first, so a failure below also says whether the control plane survived.
    assert_healthy(&cp, "after a 20 MiB request body").await;
    match outcome {
        Ok(r) => {
            eprintln!("a 20 MiB request body: {}", r.summary());
            assert_eq!(
                r.status,
                413,
                "a 20 MiB request body must be refused with 413: {}",
                r.summary()
            );
        }
        Err(e) => panic!(
            "a 20 MiB request body must be answered with a 4xx; instead the client got a \
             transport error (the control plane closed the connection while the body was still \
             being sent, and its answer, if any, was lost): {e:#}\n{}",
            cp.process.describe()
        ),
    }
    assert_healthy(&cp, "after the oversized requests").await;
    let p = cp.policies().await;
    assert_eq!(p["version"], version, "nothing was written: {p}");
    assert!(
        p["error"].is_null(),
        "no error after refused requests: {}",
        p["error"]
    );
    assert_serves(&client, 10, &["api-1"], "after the oversized requests").await;
}

// ---------------------------------------------------------------------------------------------
// gRPC server caps
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connection_cap_holds_under_a_flood() {
    const CAP: usize = 8;
    const FLOOD: usize = 40;
    let policies = mesh_policies();
    let cp = control_plane(&policies, &["--grpc-max-connections", &CAP.to_string()]).await;
    let _api1 = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let m = cp.metrics().await;
    assert_eq!(
        m.sum(CONNECTIONS_REFUSED, &[("server", "grpc")]),
        0.0,
        "two proxies fit under a cap of {CAP}: {}",
        m.lines_for(CONNECTIONS_REFUSED)
    );
    let web_since = connected_entry(&cp, "web-1").await["connected_since"].clone();

    // The flood: raw TCP connections that never say anything, held open.
    let mut flood = open_raw_connections(cp.grpc_addr, FLOOD).await;
    // At most CAP connections hold a slot, so at least FLOOD - CAP were closed at accept.
    let refused = wait_cp_metric_at_least(
        &cp,
        CONNECTIONS_REFUSED,
        &[("server", "grpc")],
        (FLOOD - CAP) as f64,
    )
    .await;
    eprintln!("flood: {refused} of {FLOOD} connections refused at accept");
    let closed = count_closed(&mut flood, Duration::from_millis(200)).await;
    eprintln!("flood: {closed} of {FLOOD} connections seen closed by the server");

    // Meanwhile the registered proxies keep serving and stay connected (no reconnect).
    assert_serves(&client, 20, &["api-1"], "during the gRPC flood").await;
    let entry = connected_entry(&cp, "web-1").await;
    assert_eq!(
        entry["connected_since"], web_since,
        "web-1 kept its discovery stream through the flood: {entry}"
    );
    connected_entry(&cp, "api-1").await;
    let m = cp.metrics().await;
    assert_eq!(
        m.get("weft_control_proxies_connected", &[]),
        Some(2.0),
        "both proxies stay connected: {}",
        m.lines_for("weft_control_proxies_connected")
    );
    assert!(
        m.sum(REGISTRATIONS_REFUSED, &[]) == 0.0,
        "the flood is refused at accept, not as registrations: {}",
        m.lines_for(REGISTRATIONS_REFUSED)
    );
    assert_healthy(&cp, "during the gRPC flood").await;

    // The flood goes; its slots come back: a new proxy registers and serves.
    drop(flood);
    let _api2 = Instance::http(&cp, "api", "api-2").await;
    wait_for_instance(&client, "api", "/", "api-2").await;
    connected_entry(&cp, "api-2").await;
    let entry = connected_entry(&cp, "web-1").await;
    assert_eq!(
        entry["connected_since"], web_since,
        "web-1 never reconnected: {entry}"
    );
    assert_serves(&client, 20, &["api-1", "api-2"], "after the flood").await;
}

/// Opens a discovery stream on `channel` whose requests come from `rx` (the caller keeps the
/// sender and never sends), and returns the status it ended with, or why it did not end with
/// one.
async fn silent_stream(
    channel: tonic::transport::Channel,
    rx: tokio::sync::mpsc::Receiver<DiscoveryRequest>,
) -> Result<tonic::Status, String> {
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut client = DiscoveryClient::new(channel);
    match client.stream(requests).await {
        Err(status) => Ok(status),
        Ok(resp) => {
            let mut responses = resp.into_inner();
            match responses.message().await {
                Err(status) => Ok(status),
                Ok(Some(push)) => Err(format!("a stream without Hello got a push: {push:?}")),
                Ok(None) => Err("the stream ended with status OK".to_owned()),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_discovery_streams_are_ended_at_the_hello_deadline() {
    const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
    const MAX_STREAMS: usize = 4;
    const SILENT: usize = 6;
    // Generous for streams that end after one or two Hello deadlines (2 s), and shorter than
    // the default --hello-timeout (10 s), so a flag that did not take effect fails the test.
    const ALL_ENDED_WITHIN: Duration = Duration::from_secs(9);
    let policies = mesh_policies();
    let cp = control_plane(
        &policies,
        &[
            "--hello-timeout",
            "1s",
            "--grpc-max-streams",
            &MAX_STREAMS.to_string(),
        ],
    )
    .await;
    let _api1 = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let web_since = connected_entry(&cp, "web-1").await["connected_since"].clone();

    // One authenticated connection, SILENT streams on it that never send their Hello.
    let cert = certify_with_openssl(cp.grpc_addr, "web", "default", Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("Certify default/web: {e}"));
    let channel = control_channel_as(cp.grpc_addr, Some(&cert)).await;
    // One round trip first, so the client has the server's SETTINGS (its stream cap) before it
    // opens the streams: opened earlier, the streams past the cap are refused by the server
    // (REFUSED_STREAM) instead of queued by the client.
    let health = tokio::time::timeout(
        DEFAULT_WAIT,
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("grpc.health.v1.Health/Check: no answer within {DEFAULT_WAIT:?}"))
    .unwrap_or_else(|e| panic!("grpc.health.v1.Health/Check: {e:?}"));
    eprintln!(
        "health before the silent streams: {:?}",
        health.into_inner()
    );
    let mut keep = Vec::new();
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..SILENT {
        let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(1);
        keep.push(tx);
        let channel = channel.clone();
        streams.push(tokio::spawn(async move {
            let outcome = silent_stream(channel, rx).await;
            (outcome, started.elapsed())
        }));
    }
    // Meanwhile a new proxy registers on its own connection and the mesh keeps serving.
    let api2 = Instance::http(&cp, "api", "api-2").await;
    assert_serves(
        &client,
        10,
        &["api-1", "api-2"],
        "while the silent streams are open",
    )
    .await;

    let mut ended = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let (outcome, at) = tokio::time::timeout(DEFAULT_WAIT, s)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "silent stream {i} did not end within {DEFAULT_WAIT:?} of its start (Hello deadline {HELLO_TIMEOUT:?})\n{}",
                    cp.process.describe()
                )
            })
            .unwrap_or_else(|e| panic!("silent stream {i}: task failed: {e}"));
        let status = outcome.unwrap_or_else(|e| panic!("silent stream {i}: {e}"));
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "silent stream {i} ends with DEADLINE_EXCEEDED: {status:?}"
        );
        ended.push(at);
    }
    drop(keep);
    ended.sort();
    eprintln!("silent streams ended after {ended:?}");
    assert!(
        ended[SILENT - 1] <= ALL_ENDED_WITHIN,
        "with --hello-timeout {HELLO_TIMEOUT:?}, every silent stream ends within \
         {ALL_ENDED_WITHIN:?} of the start; they ended after {ended:?}"
    );
    // Only MAX_STREAMS streams are open on the connection at once: the others wait (client
    // side) for one to end, so they cannot end before two Hello deadlines have passed.
    let queued = ended[MAX_STREAMS];
    assert!(
        queued >= 2 * HELLO_TIMEOUT - Duration::from_millis(100),
        "with --grpc-max-streams {MAX_STREAMS}, stream {} of {SILENT} could only start after one \
         of the first {MAX_STREAMS} ended (>= {HELLO_TIMEOUT:?}), so it ends >= {:?} after the \
         start; it ended after {queued:?}: more than {MAX_STREAMS} streams ran at once \
         (all ended at {ended:?})",
        MAX_STREAMS + 1,
        2 * HELLO_TIMEOUT,
    );

    let timeouts = wait_cp_metric_at_least(
        &cp,
        REGISTRATIONS_REFUSED,
        &[("reason", "hello_timeout")],
        SILENT as f64,
    )
    .await;
    tokio::time::sleep(SETTLE).await;
    let m = cp.metrics().await;
    assert_eq!(
        m.sum(REGISTRATIONS_REFUSED, &[("reason", "hello_timeout")]),
        SILENT as f64,
        "exactly the {SILENT} silent streams count as hello_timeout (saw {timeouts}): {}",
        m.lines_for(REGISTRATIONS_REFUSED)
    );
    assert_eq!(
        m.sum(REGISTRATIONS_REFUSED, &[]),
        SILENT as f64,
        "no other refusal: {}",
        m.lines_for(REGISTRATIONS_REFUSED)
    );

    // The real proxies were never disturbed.
    let entry = connected_entry(&cp, "web-1").await;
    assert_eq!(
        entry["connected_since"], web_since,
        "web-1 kept its discovery stream: {entry}"
    );
    connected_entry(&cp, api2.proxy.id()).await;
    wait_for_instance(&client, "api", "/", "api-2").await;
    assert_serves(&client, 20, &["api-1", "api-2"], "after the silent streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_caps_refuse_without_disturbing_registered_proxies() {
    let policies = mesh_policies();
    let cp = control_plane(&policies, &["--max-registrations-per-service", "2"]).await;
    let api1 = Instance::http(&cp, "api", "api-1").await;
    let api2 = Instance::http(&cp, "api", "api-2").await;
    let since: Vec<serde_json::Value> = [
        connected_entry(&cp, "api-1").await,
        connected_entry(&cp, "api-2").await,
    ]
    .iter()
    .map(|e| e["connected_since"].clone())
    .collect();

    // A third api, with a genuine api SVID: one registration too many.
    let cert = certify_with_openssl(cp.grpc_addr, "api", "default", Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("Certify default/api: {e}"));
    let third_addr = free_addr(next_loopback_ip());
    let node = Node {
        id: "api-3".into(),
        service: "api".into(),
        namespace: "default".into(),
        inbound_address: third_addr.to_string(),
        ..Default::default()
    };
    let outcome = tokio::time::timeout(
        DEFAULT_WAIT,
        try_register_node(cp.grpc_addr, Some(&cert), node),
    )
    .await
    .unwrap_or_else(|_| panic!("registering api-3: no answer within {DEFAULT_WAIT:?}"));
    let status = match outcome {
        Ok(_registered) => panic!(
            "a third api registration was accepted past --max-registrations-per-service 2\n{}",
            cp.process.describe()
        ),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "the third api registration is refused with RESOURCE_EXHAUSTED: {status:?}"
    );
    let m = cp.metrics().await;
    assert_eq!(
        m.sum(REGISTRATIONS_REFUSED, &[("reason", "too_many")]),
        1.0,
        "the refusal is counted as too_many: {}",
        m.lines_for(REGISTRATIONS_REFUSED)
    );

    // Another service still registers; it sees exactly the two api endpoints.
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    wait_for_instance(&client, "api", "/", "api-2").await;
    let t = tally(&client, "api", "/", 40).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") + t.count("api-2") == 40,
        "web -> api is answered by api-1 and api-2 only: {t:?}"
    );
    let dump = web.config_dump().await;
    let endpoints = dump["endpoints"].to_string();
    for present in [api1.endpoint(), api2.endpoint()] {
        assert!(
            endpoints.contains(&present.to_string()),
            "web's endpoints include {present}: {endpoints}"
        );
    }
    assert!(
        !endpoints.contains(&third_addr.to_string()),
        "web's endpoints never include the refused {third_addr}: {endpoints}"
    );
    let api_endpoints: Vec<serde_json::Value> = cp
        .get_json("/v1/endpoints")
        .await
        .as_array()
        .unwrap_or_else(|| panic!("GET /v1/endpoints is an array"))
        .iter()
        .filter(|e| e["cluster"] == "api.default")
        .cloned()
        .collect();
    assert_eq!(
        api_endpoints.len(),
        2,
        "the control plane holds exactly two api endpoints: {api_endpoints:?}"
    );

    // The registered api proxies never reconnected.
    for (id, since) in ["api-1", "api-2"].iter().zip(&since) {
        let entry = connected_entry(&cp, id).await;
        assert_eq!(
            &entry["connected_since"], since,
            "{id} kept its registration: {entry}"
        );
    }
    let ids: Vec<String> = cp
        .proxies()
        .await
        .as_array()
        .unwrap_or_else(|| panic!("GET /v1/proxies is an array"))
        .iter()
        .map(|p| p["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !ids.iter().any(|i| i == "api-3"),
        "the refused api-3 is not listed: {ids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Admin API caps
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connection_cap_and_header_timeout() {
    const CAP: usize = 4;
    const HELD: usize = 10;
    let policies = mesh_policies();
    let cp = control_plane(&policies, &["--admin-max-connections", &CAP.to_string()]).await;
    let m = cp.metrics().await;
    assert_eq!(
        m.sum(CONNECTIONS_REFUSED, &[("server", "admin")]),
        0.0,
        "nothing refused before the test: {}",
        m.lines_for(CONNECTIONS_REFUSED)
    );

    // Let the server notice that the scrape's connection is gone, so it holds no slot.
    tokio::time::sleep(SETTLE).await;

    // HELD raw connections that never start TLS, held open; then one more admin request.
    let flooded_at = Instant::now();
    let mut held = open_raw_connections(cp.admin_addr, HELD).await;
    let attempt = try_admin(&cp, Method::GET, "/healthz", Bytes::new()).await;
    let elapsed = flooded_at.elapsed();
    let closed = count_closed(&mut held, Duration::from_secs(1)).await;
    let open = HELD - closed;
    eprintln!(
        "admin flood: {closed} of {HELD} connections closed at once, {open} held; a request \
         {elapsed:?} after the flood began: {}",
        match &attempt {
            Ok(r) => r.summary(),
            Err(e) => format!("refused ({e:#})"),
        }
    );
    assert!(
        open <= CAP,
        "at most {CAP} of the {HELD} connections are held open by the server, {open} were"
    );
    // The server drops held connections at its 10 s TLS handshake timeout: before that, the
    // request could only be served if the flood left a slot free (a connection of before the
    // flood was still being closed).
    if let Ok(r) = &attempt {
        assert!(
            open < CAP || elapsed >= Duration::from_secs(9),
            "with {open} connections held and --admin-max-connections {CAP}, one more admin \
             request was served: {}",
            r.summary()
        );
    }
    drop(held);

    // Once they are gone the admin API works again, and counted what it refused: at most CAP of
    // the HELD connections got a slot.
    let m = metrics_when_admitted(&cp).await;
    let refused = m.sum(CONNECTIONS_REFUSED, &[("server", "admin")]);
    assert!(
        refused >= (HELD - CAP) as f64,
        "at least {} admin connections refused at accept, counted: {}",
        HELD - CAP,
        m.lines_for(CONNECTIONS_REFUSED)
    );
    assert_healthy(&cp, "after the admin flood").await;
    cp.policies().await;

    // Half a request head, over TLS: the server closes the connection at its header-read
    // timeout (10 s), well within 20 s.
    slow_head_is_closed(&cp).await;
    assert_healthy(&cp, "after the slow client").await;
}

/// Connects to the admin API with `openssl s_client`, completes the TLS handshake, sends half a
/// request head and keeps the connection open: the server must close it within 20 s.
async fn slow_head_is_closed(cp: &ControlPlane) {
    use tokio::io::AsyncWriteExt;
    const CLOSE_DEADLINE: Duration = Duration::from_secs(20);
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(cp.admin_addr.to_string())
        .arg("-brief")
        .arg("-nocommands")
        .arg("-verify_return_error")
        .arg("-CAfile")
        .arg(cp.roots_pem())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning openssl s_client: {e}"));
    // Kept open (outside the child) until the end: only the server may end the connection.
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: weft-control\r\n")
        .await
        .unwrap_or_else(|e| panic!("writing half a request head to openssl s_client: {e}"));
    stdin
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flushing openssl s_client's stdin: {e}"));
    let out = tokio::time::timeout(CLOSE_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a connection that sent half a request head was still open {CLOSE_DEADLINE:?} \
                 later: no header-read timeout\n{}",
                cp.process.describe()
            )
        })
        .unwrap_or_else(|e| panic!("waiting for openssl s_client: {e}"));
    let closed_after = started.elapsed();
    drop(stdin);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "half a request head: closed by the server after {closed_after:?} ({}); stdout {stdout:?}; stderr {stderr:?}",
        out.status
    );
    assert!(
        stderr.contains("CONNECTION ESTABLISHED"),
        "the TLS handshake completed before the half head was sent (so the close is the \
         header-read timeout's, not a handshake failure): {stderr}"
    );
    assert!(
        !stdout.contains("HTTP/1.1 2"),
        "half a request head is never answered as a request: {stdout}"
    );
}
