//! Scenario helpers shared by the end-to-end tests in `tests/`: a service instance (demo app +
//! its sidecar), a caller-only sidecar, and traffic loops that are always bounded.
//!
//! The tests need the workspace's binaries: `cargo build --workspace --bins` first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, DemoApp, DemoAppConfig, HttpClient,
    HttpResponse, Proxy, ProxyConfig, DEFAULT_WAIT,
};

/// One instance of a mesh service: a demo app and the sidecar in front of it. Dropping it stops
/// the sidecar first (fields drop in order), then the app.
#[derive(Debug)]
pub struct Instance {
    pub proxy: Proxy,
    pub app: DemoApp,
}

impl Instance {
    /// An HTTP service instance: the sidecar's inbound listener forwards to the app's HTTP port.
    pub async fn http(cp: &ControlPlane, service: &str, instance: &str) -> Instance {
        let app = DemoApp::start(service, instance).await;
        let proxy = Proxy::start(&cp.grpc_url(), service, instance, app.http_addr()).await;
        Instance { proxy, app }
    }

    /// A gRPC service instance: the inbound listener forwards to the app's gRPC port.
    pub async fn grpc(cp: &ControlPlane, service: &str, instance: &str) -> Instance {
        let app = DemoApp::start_with(DemoAppConfig::new(service, instance).with_grpc()).await;
        let proxy = Proxy::start(&cp.grpc_url(), service, instance, app.grpc_addr()).await;
        Instance { proxy, app }
    }

    /// A TCP service instance: the inbound listener forwards to the app's TCP echo port.
    pub async fn tcp(cp: &ControlPlane, service: &str, instance: &str) -> Instance {
        let app = DemoApp::start_with(DemoAppConfig::new(service, instance).with_tcp()).await;
        let proxy = Proxy::start(&cp.grpc_url(), service, instance, app.tcp_addr()).await;
        Instance { proxy, app }
    }

    /// The address the control plane registers for this instance.
    pub fn endpoint(&self) -> SocketAddr {
        self.proxy.inbound_addr()
    }
}

/// A sidecar for a service whose app is the test itself (it sends requests to the outbound
/// listener); its inbound app address is a port nothing listens on.
pub async fn caller_proxy(cp: &ControlPlane, service: &str, id: &str) -> Proxy {
    Proxy::start_with(caller_proxy_config(cp, service, id)).await
}

/// The config [`caller_proxy`] uses, on a fresh loopback IP.
pub fn caller_proxy_config(cp: &ControlPlane, service: &str, id: &str) -> ProxyConfig {
    let ip = next_loopback_ip();
    ProxyConfig::on_ip(ip, &cp.grpc_url(), service, id, free_addr(ip))
}

/// `services:` YAML declaring plain HTTP services with default settings.
pub fn http_services_yaml(names: &[&str]) -> String {
    let mut yaml = String::from("services:\n");
    for n in names {
        yaml.push_str(&format!("  - name: {n}\n"));
    }
    yaml
}

/// The instance that answered (`x-demo-instance`), or "" for a response from no demo app.
pub fn instance_of(resp: &HttpResponse) -> String {
    resp.header("x-demo-instance").unwrap_or("").to_string()
}

/// Waits until `GET http://<host><path>` through `client` answers 200 from `instance`: the
/// route and its endpoints have reached the proxy.
pub async fn wait_for_instance(
    client: &HttpClient,
    host: &str,
    path: &str,
    instance: &str,
) -> HttpResponse {
    let what = format!(
        "GET http://{host}{path} via {} is answered 200 by {instance}",
        client.addr()
    );
    wait_until(DEFAULT_WAIT, &what, async || {
        let r = client.get(host, path).await?;
        if r.status == 200 && instance_of(&r) == instance {
            Ok(r)
        } else {
            Err(anyhow::anyhow!(
                "{} from {:?}",
                r.summary(),
                instance_of(&r)
            ))
        }
    })
    .await
}

/// What a bounded run of requests got.
#[derive(Debug, Default)]
pub struct Tally {
    /// 200 responses per answering instance.
    pub by_instance: BTreeMap<String, usize>,
    /// Every non-200 response or transport error, described.
    pub errors: Vec<String>,
}

impl Tally {
    pub fn count(&self, instance: &str) -> usize {
        self.by_instance.get(instance).copied().unwrap_or(0)
    }
}

/// Sends `n` sequential `GET http://<host><path>` through `client` and tallies who answered.
pub async fn tally(client: &HttpClient, host: &str, path: &str, n: usize) -> Tally {
    let mut t = Tally::default();
    for i in 0..n {
        match client.get(host, path).await {
            Ok(r) if r.status == 200 => *t.by_instance.entry(instance_of(&r)).or_default() += 1,
            Ok(r) => t.errors.push(format!("request {i}: {}", r.summary())),
            Err(e) => t.errors.push(format!("request {i}: {e:#}")),
        }
    }
    t
}

/// Waits until the scrape `scrape` returns has `name{labels}` (summed) at least `min`.
pub async fn wait_metric_at_least<F>(
    what: &str,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
    mut scrape: F,
) where
    F: AsyncFnMut() -> weft_testkit::Metrics,
{
    let what = format!("{what}: {name}{labels:?} >= {min}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let m = scrape().await;
        let v = m.sum(name, labels);
        if v >= min {
            Ok(v)
        } else {
            Err(format!("{v}; lines: {}", m.lines_for(name)))
        }
    })
    .await;
}

/// A short pause used only to let something *not* happen (e.g. give a bad config time to be
/// wrongly applied) before checking it did not.
pub const SETTLE: Duration = Duration::from_millis(500);
