//! The config lifecycle of a running mesh: swaps under load lose no request and send none to a
//! destination that was not valid at the time, a listener whose address changes binds the new
//! one before draining the old, many proxies converge on an `apply`, and a snapshot a proxy
//! cannot apply is NACKed, reported, and recovered from.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::{
    caller_proxy, caller_proxy_config_on, caller_proxy_on, http_services_yaml, proxy_status, tally,
    wait_for_instance, wait_metric_at_least, weftctl, Generations, Instance, LoadSpec, MixedLoad,
};
use weft_testkit::{
    free_port, next_loopback_ip, wait_until, ControlPlane, DemoApp, DemoAppConfig, Metrics,
    PolicyDir, Proxy, DEFAULT_WAIT,
};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// `PUT /v1/policies/<name>` on the control plane, expecting 200.
async fn put_policy(cp: &ControlPlane, name: &str, yaml: &str) {
    let url = cp.admin_url(&format!("/v1/policies/{name}"));
    let resp = cp.put(&format!("/v1/policies/{name}"), yaml).await;
    assert_eq!(
        resp.status,
        200,
        "PUT {url} rejected: {}\n{yaml}",
        resp.summary()
    );
}

/// Waits until `proxy`'s `/config_dump` routes hold a route named `route`.
async fn wait_route(proxy: &Proxy, route: &str) {
    let needle = format!("\"{route}\"");
    let what = format!("{}'s /config_dump routes include route {route}", proxy.id());
    wait_until(DEFAULT_WAIT, &what, async || {
        let routes = proxy.config_dump().await["routes"].to_string();
        if routes.contains(&needle) {
            Ok(())
        } else {
            Err(routes)
        }
    })
    .await;
}

// ----------------------------------------------------------------- swap under load

/// The route destinations of generation `g` (service, weight); every one is a different set,
/// and v1 is absent from two of the four (its cluster leaves the caller's snapshot then).
fn destinations(g: u64) -> &'static [(&'static str, u32)] {
    const CYCLE: [&[(&str, u32)]; 4] = [
        &[("v1", 100)],
        &[("v1", 50), ("v2", 50)],
        &[("v2", 100)],
        &[("v3", 70), ("v2", 30)],
    ];
    CYCLE[(g % 4) as usize]
}

/// The whole policy of generation `g`: `web` may call only `api` (plus `extra` on odd
/// generations), so its clusters are `api`, the route's destinations and, on odd generations,
/// `extra`, a static-endpoint service no route points at. Each generation names its route
/// `api-g<g>` so the test can see which one a proxy runs.
fn swap_policy(g: u64, v3: SocketAddr, extra: SocketAddr) -> String {
    let odd = g % 2 == 1;
    let mut yaml = String::from("services:\n  - name: web\n");
    yaml.push_str(if odd {
        "    dependencies: [api, extra]\n"
    } else {
        "    dependencies: [api]\n"
    });
    yaml.push_str("  - name: api\n  - name: v1\n  - name: v2\n");
    yaml.push_str(&format!(
        "  - name: v3\n    endpoints:\n      - address: {v3}\n"
    ));
    if odd {
        yaml.push_str(&format!(
            "  - name: extra\n    endpoints:\n      - address: {extra}\n"
        ));
    }
    yaml.push_str(&format!(
        "routes:\n  - name: api-g{g}\n    service: api\n    destinations:\n"
    ));
    for (service, weight) in destinations(g) {
        yaml.push_str(&format!(
            "      - {{service: {service}, weight: {weight}}}\n"
        ));
    }
    yaml
}

/// Route and cluster swaps under mixed HTTP/1.1 keep-alive, HTTP/1.1 connection-per-request and
/// h2c load: no request fails, and each answer comes from a destination of a generation that
/// was running somewhere between the request's send and its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_drop_nothing_and_route_only_to_valid_destinations() {
    const CHANGES: u64 = 24;
    let v3_app = DemoApp::start("v3", "v3-static").await;
    let extra_app = DemoApp::start("extra", "extra-static").await;
    let (v3, extra) = (v3_app.http_addr(), extra_app.http_addr());
    let policies = PolicyDir::with_file("mesh.yaml", &swap_policy(0, v3, extra));
    let cp = ControlPlane::start(policies.path()).await;
    let v1a = Instance::http(&cp, "v1", "v1-a").await;
    let v1b = Instance::http(&cp, "v1", "v1-b").await;
    let _v2 = Instance::http(&cp, "v2", "v2-a").await;
    let mut web = caller_proxy(&cp, "web", "web-1").await;
    // Generation 0 routes to v1 only; v2's cluster (and endpoints) join web's snapshot later.
    for e in [v1a.endpoint(), v1b.endpoint()] {
        web.wait_endpoint(e, true).await;
    }
    wait_route(&web, "api-g0").await;
    let client = web.http1();
    let first = wait_for_instance(&client, "api", "/", "v1-a").await;
    assert_eq!(first.json()["service"], "v1", "{}", first.summary());

    let generations = Arc::new(Generations::default());
    let spec = LoadSpec {
        target: web.outbound_addr(),
        hosts: vec!["api".into(), "api.default.svc.cluster.local".into()],
        tasks_per_kind: 2,
        max_per_task: 1000,
        max_duration: Duration::from_secs(90),
        pause: Duration::from_millis(3),
        slow_every: 10,
        slow_ms: 150,
    };
    let load = MixedLoad::start(&spec, &generations);
    load.wait_sent(100).await;
    let mut changes_under_load = 0;
    for g in 1..=CHANGES {
        generations.written.store(g, Ordering::SeqCst);
        put_policy(&cp, "mesh.yaml", &swap_policy(g, v3, extra)).await;
        wait_route(&web, &format!("api-g{g}")).await;
        generations.applied.store(g, Ordering::SeqCst);
        let sent = load.sent();
        // Let the load see this generation alone for a moment before the next change; this
        // also proves the load was still running (wait_sent fails if the tasks stopped).
        load.wait_sent(sent + 100).await;
        changes_under_load += 1;
    }
    let sent = load.sent();
    load.wait_sent(sent + 200).await;
    let report = load.finish().await;

    // Every answer's service must be a destination of a generation in the request's window.
    let mut invalid = Vec::new();
    for r in &report.records {
        if let Ok((service, instance)) = &r.result {
            let valid: BTreeSet<&str> = (r.sent_applied..=r.received_written)
                .flat_map(|g| destinations(g).iter().map(|(s, _)| *s))
                .collect();
            if !valid.contains(service.as_str()) {
                invalid.push(format!(
                    "{:?} http://{}{} generations {}..={} valid {valid:?}: answered by {service} ({instance})",
                    r.kind, r.host, r.path, r.sent_applied, r.received_written
                ));
            }
        }
    }
    let failures = report.failures();
    println!(
        "swap under load: {} requests {:?}, {changes_under_load} changes under load, \
         {} failed, {} invalid destinations, answers by service {:?}",
        report.records.len(),
        report.by_kind(),
        failures.len(),
        invalid.len(),
        report.by_service()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the swaps: {}\n{}",
        report.describe_failures(20),
        web.process.describe()
    );
    assert!(
        invalid.is_empty(),
        "{} answers came from a destination not valid while the request was out:\n{}",
        invalid.len(),
        invalid
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let by_service = report.by_service();
    for s in ["v1", "v2", "v3"] {
        assert!(
            by_service.get(s).copied().unwrap_or(0) > 0,
            "no answer from {s}: the load did not span the route changes: {by_service:?}"
        );
    }
    web.process.assert_running();
    wait_metric_at_least(
        "web-1 acked every route change",
        "weft_config_updates_total",
        &[("type", "routes"), ("result", "ack")],
        (CHANGES + 1) as f64,
        async || web.metrics().await,
    )
    .await;
    let m = web.metrics().await;
    assert_eq!(
        m.sum("weft_config_updates_total", &[("result", "nack")]),
        0.0,
        "no change was NACKed: {}",
        m.lines_for("weft_config_updates_total")
    );
}

// ----------------------------------------------------------------- listener address change

/// Writes `payload`, half-closes, and reads until EOF.
async fn echo_roundtrip(addr: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(payload).await?;
        wr.shutdown().await?;
        anyhow::Ok(())
    };
    let read = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await?;
        anyhow::Ok(got)
    };
    let (w, r) = tokio::time::timeout(IO_TIMEOUT, async { tokio::join!(write, read) })
        .await
        .map_err(|_| anyhow::anyhow!("no EOF from {addr} within {IO_TIMEOUT:?}"))?;
    w?;
    r
}

/// Waits until an echo through `addr` returns the bytes sent.
async fn wait_echo(addr: SocketAddr) {
    let what = format!("a TCP echo through {addr} returns the bytes sent");
    wait_until(DEFAULT_WAIT, &what, async || {
        let got = echo_roundtrip(addr, b"probe").await?;
        if got == b"probe" {
            Ok(())
        } else {
            Err(anyhow::anyhow!("got {:?}", String::from_utf8_lossy(&got)))
        }
    })
    .await;
}

/// Sends `msg` on an open echo connection and reads it back.
async fn echo_on(stream: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    let fut = async {
        stream.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        stream.read_exact(&mut got).await?;
        anyhow::ensure!(got == msg, "echoed {:?}", String::from_utf8_lossy(&got));
        anyhow::Ok(())
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow::anyhow!("no echo within {IO_TIMEOUT:?}"))?
}

fn tcp_service_yaml(port: u16) -> String {
    format!("services:\n  - name: web\n  - name: store\n    protocol: tcp\n    port: {port}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_tcp_port_binds_the_new_address_before_draining_the_old() {
    const DRAIN: Duration = Duration::from_secs(6);
    let web_ip = next_loopback_ip();
    let (old_port, new_port) = (free_port(web_ip), free_port(web_ip));
    assert_ne!(old_port, new_port);
    let (old, new) = (
        SocketAddr::new(web_ip, old_port),
        SocketAddr::new(web_ip, new_port),
    );
    let policies = PolicyDir::with_file("tcp.yaml", &tcp_service_yaml(old_port));
    let cp = ControlPlane::start(policies.path()).await;
    let store = Instance::tcp(&cp, "store", "store-1").await;
    let mut config = caller_proxy_config_on(&cp, web_ip, "web", "web-1");
    config.drain_timeout = DRAIN;
    let web = Proxy::start_with(config).await;
    web.wait_endpoint(store.endpoint(), true).await;
    wait_echo(old).await;

    // A connection opened before the change.
    let mut open = TcpStream::connect(old)
        .await
        .expect("connect to the old port");
    echo_on(&mut open, b"before the change")
        .await
        .expect("echo on the open connection before the change");

    // Probe both ports in turn (old first) while the address changes: an iteration where the
    // old port already refuses and the new one still refuses would be a window with neither.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let connects = async |a: SocketAddr| {
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(a)).await,
                    Ok(Ok(_))
                )
            };
            let mut seen = Vec::new();
            // Bounded: at most 4000 iterations of >= 5 ms, and stops when told.
            for _ in 0..4000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let old_ok = connects(old).await;
                let new_ok = connects(new).await;
                seen.push((old_ok, new_ok));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let changed_at = Instant::now();
    put_policy(&cp, "tcp.yaml", &tcp_service_yaml(new_port)).await;
    wait_echo(new).await;
    wait_until(
        DEFAULT_WAIT,
        &format!("the removed listener {old} refuses new connections"),
        async || match TcpStream::connect(old).await {
            Err(_) => Ok(()),
            Ok(_) => Err(format!("{old} still accepts")),
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let seen = probe.await.expect("the probe task");

    // The connection opened before the change still works while the old listener drains.
    let since_change = changed_at.elapsed();
    echo_on(&mut open, b"after the change")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the open connection stopped working {since_change:?} after the change \
             (drain timeout {DRAIN:?}): {e:#}\n{}",
                web.process.describe()
            )
        });
    let dump = web.config_dump().await;
    let listeners = dump["listeners"].to_string();
    assert!(
        listeners.contains(&new.to_string()) && !listeners.contains(&old.to_string()),
        "config_dump listeners moved from {old} to {new}: {listeners}"
    );

    let gaps = seen.iter().filter(|(o, n)| !o && !n).count();
    let before = seen.iter().take_while(|(o, _)| *o).count();
    println!(
        "listener move {old} -> {new}: {} probe rounds, {before} before the old port refused, \
         {gaps} with neither port accepting",
        seen.len()
    );
    assert!(
        seen.first() == Some(&(true, false)),
        "before the change only the old port accepts: {:?}",
        seen.first()
    );
    assert_eq!(
        gaps, 0,
        "rounds where neither {old} nor {new} accepted (the new address must be bound before the \
         old drains): {seen:?}"
    );

    // After the drain timeout the proxy cuts the remaining connection.
    let mut buf = [0u8; 64];
    let cut = tokio::time::timeout(DRAIN + DEFAULT_WAIT, open.read(&mut buf)).await;
    match cut {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected {n} bytes on the draining connection"),
        Err(_) => panic!(
            "the connection to the removed listener {old} was not closed within the drain \
             timeout {DRAIN:?} + {DEFAULT_WAIT:?}\n{}",
            web.process.describe()
        ),
    }
    println!(
        "draining connection closed {:?} after the change (drain timeout {DRAIN:?})",
        changed_at.elapsed()
    );
    assert!(
        TcpStream::connect(old).await.is_err(),
        "{old} accepts again"
    );
    wait_echo(new).await;
}

// ----------------------------------------------------------------- convergence

/// The acked routes version per proxy id, from `GET /v1/proxies`.
fn acked_routes(proxies: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    proxies
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["id"].as_str().unwrap_or_default().to_string(),
                        p["versions"]["routes"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn push_stats(m: &Metrics) -> (f64, f64, f64) {
    (
        m.sum("weft_control_push_duration_seconds_count", &[]),
        m.sum("weft_control_push_duration_seconds_sum", &[]),
        m.sum("weft_control_pushes_total", &[("result", "ack")]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_converges_on_ten_proxies() {
    const N: usize = 10;
    let api = DemoApp::start("api", "api-static").await;
    let api_b = DemoApp::start("api-b", "api-b-static").await;
    let policies = PolicyDir::with_file(
        "00-mesh.yaml",
        &format!(
            "services:\n  - name: web\n  - name: api\n    endpoints:\n      - address: {}\n  \
             - name: api-b\n    endpoints:\n      - address: {}\n",
            api.http_addr(),
            api_b.http_addr()
        ),
    );
    let cp = ControlPlane::start(policies.path()).await;
    let starts = (0..N).map(|i| {
        let cp = &cp;
        async move { caller_proxy(cp, "web", &format!("web-{i:02}")).await }
    });
    let proxies: Vec<Proxy> = futures::future::join_all(starts).await;
    let ips: BTreeSet<IpAddr> = proxies.iter().map(Proxy::ip).collect();
    assert_eq!(ips.len(), N, "each proxy on its own loopback IP");
    let before = wait_until(
        DEFAULT_WAIT,
        "GET /v1/proxies lists 10 proxies, each with an acked routes version",
        async || {
            let acked = acked_routes(&cp.proxies().await);
            if acked.len() == N && acked.values().all(|v| !v.is_empty()) {
                Ok(acked)
            } else {
                Err(format!("{acked:?}"))
            }
        },
    )
    .await;
    for p in &proxies {
        wait_for_instance(&p.http1(), "api", "/", "api-static").await;
    }
    let metrics_before = cp.metrics().await;
    let (count0, sum0, acks0) = push_stats(&metrics_before);

    let scratch = PolicyDir::with_file(
        "10-canary.yaml",
        "routes:\n  - name: api-to-b\n    service: api\n    destinations:\n      - {service: api-b, weight: 100}\n",
    );
    let file = scratch.file("10-canary.yaml");
    let file = file.to_string_lossy();
    let started = Instant::now();
    let (out, desc) = weftctl(&cp, &["apply", "-f", &file]).await;
    assert!(out.status.success(), "{desc}");
    // Poll every 10 ms (bounded by the deadline) so the measured time is close to the last ACK.
    let deadline = started + DEFAULT_WAIT;
    let (converged_in, acked) = loop {
        let acked = acked_routes(&cp.proxies().await);
        let done = acked.len() == N
            && acked
                .iter()
                .all(|(id, v)| !v.is_empty() && before.get(id) != Some(v));
        if done {
            break (started.elapsed(), acked);
        }
        assert!(
            Instant::now() < deadline,
            "not every proxy acked new routes within {DEFAULT_WAIT:?} of `weftctl apply`: \
             before {before:?}, now {acked:?}\n{}",
            cp.process.describe()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("convergence: `weftctl apply` to the last of {N} ACKs (routes) took {converged_in:?}");

    // Each proxy runs what the control plane says it acked, and routes by it.
    for p in &proxies {
        let dump = p.config_dump().await;
        assert!(
            dump["routes"].to_string().contains("\"api-to-b\""),
            "{} runs the new route: {}",
            p.id(),
            dump["routes"]
        );
        let versions = weft_testkit::ConfigVersions::from_dump(&dump);
        assert_eq!(
            Some(&versions.routes),
            acked.get(p.id()),
            "{}'s running routes version is the one /v1/proxies shows acked",
            p.id()
        );
        let t = tally(&p.http1(), "api", "/", 3).await;
        assert_eq!(t.count("api-b-static"), 3, "{}: {t:?}", p.id());
    }
    let metrics_after = wait_until(
        DEFAULT_WAIT,
        "weft-control counts 10 more acked pushes and push durations",
        async || {
            let m = cp.metrics().await;
            let (count, _, acks) = push_stats(&m);
            if count >= count0 + N as f64 && acks >= acks0 + N as f64 {
                Ok(m)
            } else {
                Err(format!(
                    "{}\n{}",
                    m.lines_for("weft_control_push_duration_seconds_count"),
                    m.lines_for("weft_control_pushes_total")
                ))
            }
        },
    )
    .await;
    let (count1, sum1, acks1) = push_stats(&metrics_after);
    let routes_acks = metrics_after.sum(
        "weft_control_pushes_total",
        &[("type", "routes"), ("result", "ack")],
    ) - metrics_before.sum(
        "weft_control_pushes_total",
        &[("type", "routes"), ("result", "ack")],
    );
    assert!(
        routes_acks >= N as f64,
        "weft_control_pushes_total{{type=routes,result=ack}} grew by {routes_acks}, want >= {N}"
    );
    println!(
        "control plane: {} more push durations (mean {:.1} ms), {} more acked pushes ({routes_acks} of routes)",
        count1 - count0,
        (sum1 - sum0) / (count1 - count0) * 1000.0,
        acks1 - acks0
    );
    assert_eq!(
        metrics_after.get("weft_control_proxies_connected", &[]),
        Some(N as f64),
        "{}",
        metrics_after.lines_for("weft_control_proxies_connected")
    );
}

// ----------------------------------------------------------------- NACK

/// web-1's row of `weftctl status`.
async fn status_row(cp: &ControlPlane) -> (String, String) {
    let (out, desc) = weftctl(cp, &["status"]).await;
    assert!(out.status.success(), "{desc}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some("web-1"))
        .unwrap_or_else(|| panic!("no web-1 row: {desc}"))
        .to_string();
    (row, desc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_conflict_is_nacked_reported_and_recovered_from() {
    let web_ip = next_loopback_ip();
    // Another process's socket on the port the policy will give the tcp service.
    let blocker = std::net::TcpListener::bind((web_ip, 0)).expect("occupy a port on web's IP");
    let taken = blocker.local_addr().expect("local addr");
    let echo = DemoApp::start_with(DemoAppConfig::new("store", "store-static").with_tcp()).await;

    let policies = PolicyDir::with_file("00-mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let versions = web.versions().await;
    let proxy_metrics = web.metrics().await;
    let nacks_before = proxy_metrics.sum(
        "weft_config_updates_total",
        &[("type", "listeners"), ("result", "nack")],
    );
    let cp_nacks_before = cp
        .metrics()
        .await
        .sum("weft_control_pushes_total", &[("result", "nack")]);

    let scratch = PolicyDir::new();
    let store_yaml = |port: u16| {
        format!(
            "services:\n  - name: store\n    protocol: tcp\n    port: {port}\n    endpoints:\n      - address: {}\n",
            echo.tcp_addr()
        )
    };
    scratch.write("20-store.yaml", &store_yaml(taken.port()));
    let file = scratch.file("20-store.yaml");
    let file = file.to_string_lossy().into_owned();
    let (out, desc) = weftctl(&cp, &["apply", "-f", &file]).await;
    assert!(
        out.status.success(),
        "the policy is valid; only web's host cannot apply it: {desc}"
    );

    let nack = wait_until(
        DEFAULT_WAIT,
        "GET /v1/proxies shows web-1 NACKing",
        async || {
            let s = proxy_status(&cp, "web-1").await.unwrap_or_default();
            match (s["last_nack"].as_str(), s["nacking"].as_bool()) {
                (Some(n), Some(true)) if !n.is_empty() => Ok(n.to_string()),
                _ => Err(format!("web-1: {s}")),
            }
        },
    )
    .await;
    assert!(
        nack.contains(&taken.to_string()),
        "the NACK reason names the address that cannot be bound ({taken}): {nack}"
    );
    let (row, desc) = status_row(&cp).await;
    assert!(
        row.contains("NACKing") && row.contains(&taken.to_string()),
        "`weftctl status` shows web-1 NACKing and the reason naming {taken}: {row}\n{desc}"
    );
    println!("weftctl status during the conflict: {row}");
    wait_metric_at_least(
        "web-1 counts a NACKed listeners update",
        "weft_config_updates_total",
        &[("type", "listeners"), ("result", "nack")],
        nacks_before + 1.0,
        async || web.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "weft-control counts a NACKed push",
        "weft_control_pushes_total",
        &[("result", "nack")],
        cp_nacks_before + 1.0,
        async || cp.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "weft-control counts one proxy NACKing",
        "weft_control_proxies_nacking",
        &[],
        1.0,
        async || cp.metrics().await,
    )
    .await;

    // The old config keeps running whole and serving.
    assert_eq!(
        web.versions().await,
        versions,
        "a NACKed update leaves every version as it was ({nack})"
    );
    let t = tally(&client, "api", "/", 20).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") == 20,
        "traffic after the NACK: {t:?}"
    );
    let m = web.metrics().await;
    for (t, v) in [
        ("listeners", &versions.listeners),
        ("routes", &versions.routes),
        ("clusters", &versions.clusters),
        ("endpoints", &versions.endpoints),
    ] {
        assert_eq!(
            m.get("weft_config_version_info", &[("type", t), ("version", v)]),
            Some(1.0),
            "weft_config_version_info still reports the running {t} version: {}",
            m.lines_for("weft_config_version_info")
        );
    }

    // The operator fixes the conflict by moving the service to a free port: ACKed, served.
    let free = free_port(web_ip);
    scratch.write("20-store.yaml", &store_yaml(free));
    let (out, desc) = weftctl(&cp, &["apply", "-f", &file]).await;
    assert!(out.status.success(), "{desc}");
    wait_until(
        DEFAULT_WAIT,
        "GET /v1/proxies shows web-1 no longer NACKing, with new listeners acked",
        async || {
            let s = proxy_status(&cp, "web-1").await.unwrap_or_default();
            let acked = s["versions"]["listeners"].as_str().unwrap_or_default();
            if s["nacking"] == false && !acked.is_empty() && acked != versions.listeners {
                Ok(())
            } else {
                Err(format!("web-1: {s}"))
            }
        },
    )
    .await;
    wait_echo(SocketAddr::new(web_ip, free)).await;
    let (row, desc) = status_row(&cp).await;
    assert!(
        !row.contains("NACKing"),
        "`weftctl status` no longer shows web-1 NACKing: {row}\n{desc}"
    );
    println!("weftctl status after the fix: {row}");
    let m = web.metrics().await;
    let now = web.versions().await;
    assert_eq!(
        m.get(
            "weft_config_version_info",
            &[("type", "listeners"), ("version", &now.listeners)]
        ),
        Some(1.0),
        "{}",
        m.lines_for("weft_config_version_info")
    );
    assert_eq!(
        cp.metrics().await.get("weft_control_proxies_nacking", &[]),
        Some(0.0),
        "no proxy NACKing after the fix"
    );
    drop(blocker);
}
