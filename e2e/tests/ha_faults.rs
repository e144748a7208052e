//! Faults of a highly available control plane, with real processes on loopback: a 3-member etcd
//! cluster (Debian `etcd-server`), 3 `weft-control` replicas (`cp-1`..`cp-3`) and proxies whose
//! bootstraps list the replicas, with bounded load running and counted:
//!
//! - the etcd leader is killed: applies, registrations and pushes go on;
//! - the replica the proxies are on is killed (SIGKILL): they move to the next one with no
//!   failed request and are pushed nothing (their versions are the new replica's too);
//! - concurrent `weftctl apply`s on the three replicas: a loser is told the revision to re-read,
//!   nothing is lost;
//! - everything restarts (etcd and replicas): policies and registrations come back from etcd;
//! - etcd is down: replicas serve their last state (traffic, new proxies), applies fail with a
//!   clear error, and everything recovers without restarts.
//!
//! Timing: lease TTL 2 s, deregistration grace 1 s (10 s and 30 s where a paused proxy must
//! stay registered through a restart of everything); every wait has a deadline, every load loop a count and a time bound, and no
//! assertion is on elapsed time.

use std::sync::Arc;
use std::time::Duration;

use weft_e2e::{
    http_services_yaml, proxy_status, tally, wait_for_instance, weftctl, Generations, Instance,
    LoadReport, LoadSpec, MixedLoad,
};
use weft_testkit::replicas::{
    failover_config, pause, resume, served, wait_same_policies, Mesh, LEASE_TTL,
};
use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, DemoApp, Proxy, DEFAULT_WAIT,
};

/// `weftctl apply -f <file>` through `cp`, which must succeed.
async fn apply(cp: &ControlPlane, file: &str) {
    let (out, desc) = weftctl(cp, &["apply", "-f", file]).await;
    assert!(out.status.success(), "{desc}");
}

/// A 3-member etcd, replicas `cp-1`..`cp-3` on it, services `web` and `api` applied and served
/// by all three; `tune` sets the replicas' timing first.
async fn start(tune: impl FnOnce(&mut Mesh)) -> (Mesh, Vec<ControlPlane>) {
    let mut mesh = Mesh::start(3).await;
    tune(&mut mesh);
    let cps = mesh.replicas(3).await;
    apply(
        &cps[0],
        &mesh.file("mesh.yaml", &http_services_yaml(&["web", "api"])),
    )
    .await;
    for cp in &cps[1..] {
        wait_same_policies(cp, &cps[0]).await;
    }
    (mesh, cps)
}

/// An instance of `service` (demo app + sidecar) whose bootstrap lists the replicas in `order`.
async fn instance(order: &[&ControlPlane], service: &str, id: &str) -> Instance {
    let app = DemoApp::start(service, id).await;
    let proxy = Proxy::start_with(failover_config(order, service, id, app.http_addr())).await;
    Instance { proxy, app }
}

/// A caller-only sidecar (the test is its app) whose bootstrap lists the replicas in `order`.
async fn caller(order: &[&ControlPlane], service: &str, id: &str) -> Proxy {
    Proxy::start_with(failover_config(
        order,
        service,
        id,
        free_addr(next_loopback_ip()),
    ))
    .await
}

/// Bounded load from `proxy` to service `api` (3 client kinds, 20 ms between one task's
/// requests, at most 3,000 requests per task and 120 s).
fn load(proxy: &Proxy) -> MixedLoad {
    MixedLoad::start(
        &LoadSpec {
            target: proxy.outbound_addr(),
            hosts: vec!["api".into()],
            tasks_per_kind: 1,
            max_per_task: 3_000,
            max_duration: Duration::from_secs(120),
            pause: Duration::from_millis(20),
            slow_every: 0,
            slow_ms: 0,
        },
        &Arc::new(Generations::default()),
    )
}

/// Finishes `load`: every request answered 200 by an `api` instance.
async fn no_failures(load: MixedLoad, what: &str) -> LoadReport {
    let report = load.finish().await;
    assert!(
        report.failures().is_empty(),
        "{what}: {}",
        report.describe_failures(10)
    );
    assert_eq!(
        report.by_service().get("api").copied().unwrap_or(0),
        report.records.len(),
        "{what}: answered by something else than api: {:?}",
        report.by_service()
    );
    report
}

/// `/config_dump` `control_plane` of `proxy`: the address its stream is open to, if open.
async fn connected_to(proxy: &Proxy) -> Option<String> {
    let cp = &proxy.config_dump().await["control_plane"];
    (cp["connected"] == true).then(|| cp["address"].as_str().unwrap_or_default().to_owned())
}

/// Waits until `proxy`'s stream is open to `cp` and `cp` lists it as its own, connected.
async fn wait_on(proxy: &Proxy, cp: &ControlPlane, replica: &str) {
    let want = cp.grpc_addr.to_string();
    wait_until(
        DEFAULT_WAIT,
        &format!("{} is connected to {replica} ({want})", proxy.id()),
        async || {
            let on = connected_to(proxy).await;
            let listed = proxy_status(cp, proxy.id()).await;
            match (&on, &listed) {
                (Some(a), Some(s))
                    if *a == want && s["replica"] == replica && s["state"] == "connected" =>
                {
                    Ok(())
                }
                _ => Err(format!("proxy says {on:?}, {replica} lists {listed:?}")),
            }
        },
    )
    .await;
}

/// Waits until `proxy`'s stream is open to some replica.
async fn wait_connected(proxy: &Proxy) {
    wait_until(
        DEFAULT_WAIT,
        &format!("{} is connected to a replica", proxy.id()),
        async || connected_to(proxy).await.ok_or("not connected"),
    )
    .await;
}

/// Waits until `proxy` holds a cluster for service `service` (an apply reached it).
async fn wait_cluster(proxy: &Proxy, service: &str) {
    let name = format!("{service}.default");
    wait_until(
        DEFAULT_WAIT,
        &format!("{} holds cluster {name}", proxy.id()),
        async || {
            let dump = proxy.config_dump().await;
            let clusters: Vec<String> = dump["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect();
            if clusters.contains(&name) {
                Ok(())
            } else {
                Err(format!("{clusters:?}"))
            }
        },
    )
    .await;
}

/// Config updates `proxy` applied or rejected so far (`weft_config_updates_total`, all types).
async fn config_updates(proxy: &Proxy) -> f64 {
    proxy.metrics().await.sum("weft_config_updates_total", &[])
}

/// Resource sets `cp` pushed so far (`weft_control_pushes_total`, every type and outcome).
async fn pushes(cp: &ControlPlane) -> f64 {
    cp.metrics().await.sum("weft_control_pushes_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_keeps_applies_registrations_and_pushes_going() {
    let (mut mesh, cps) = start(|_| {}).await;
    let [cp1, cp2, cp3] = [&cps[0], &cps[1], &cps[2]];
    // Proxies spread over the three replicas, so every replica pushes.
    let api1 = instance(&[cp1, cp2, cp3], "api", "api-1").await;
    let api2 = instance(&[cp2, cp3, cp1], "api", "api-2").await;
    let web1 = caller(&[cp3, cp1, cp2], "web", "web-1").await;
    for id in ["api-1", "api-2"] {
        wait_for_instance(&web1.http1(), "api", "/", id).await;
    }
    let traffic = load(&web1);
    traffic.wait_sent(30).await;

    let leader = mesh.etcd.wait_leader().await;
    mesh.etcd.kill(leader);
    let new_leader = mesh.etcd.wait_leader().await;
    assert_ne!(new_leader, leader);

    // An apply through every replica after the kill, each at the first try, reaches every
    // proxy whichever replica it is on.
    for (i, cp) in cps.iter().enumerate() {
        let service = format!("extra-{i}");
        apply(
            cp,
            &mesh.file(&format!("{service}.yaml"), &http_services_yaml(&[&service])),
        )
        .await;
    }
    for proxy in [&api1.proxy, &api2.proxy, &web1] {
        for i in 0..3 {
            wait_cluster(proxy, &format!("extra-{i}")).await;
        }
    }
    // Registrations go on: an instance joining now is an endpoint for a caller on another
    // replica (through etcd).
    let _api3 = instance(&[cp1, cp2, cp3], "api", "api-3").await;
    wait_for_instance(&web1.http1(), "api", "/", "api-3").await;
    assert!(mesh.etcd.value("/weft/registrations/api-3").is_some());

    no_failures(traffic, "load through web-1 across the etcd leader's death").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_move_off_a_killed_replica_without_a_failed_request_or_a_repush() {
    let (mesh, mut cps) = start(|_| {}).await;
    let (api1, api2, web1, web2) = {
        let order = [&cps[0], &cps[1], &cps[2]];
        (
            instance(&order, "api", "api-1").await,
            instance(&order, "api", "api-2").await,
            caller(&order, "web", "web-1").await,
            caller(&order, "web", "web-2").await,
        )
    };
    let proxies = [&api1.proxy, &api2.proxy, &web1, &web2];
    for p in proxies {
        wait_on(p, &cps[0], "cp-1").await;
    }
    for web in [&web1, &web2] {
        for id in ["api-1", "api-2"] {
            wait_for_instance(&web.http1(), "api", "/", id).await;
        }
    }
    let mut before = Vec::new();
    for p in proxies {
        before.push((p.versions().await, config_updates(p).await));
    }
    let pushed_before = (pushes(&cps[1]).await, pushes(&cps[2]).await);
    let loads = [load(&web1), load(&web2)];
    for l in &loads {
        l.wait_sent(30).await;
    }

    cps[0].process.kill();
    for p in proxies {
        wait_on(p, &cps[1], "cp-2").await;
    }
    // The dead replica's lease expires (TTL) and its keys would be gone after the grace: the
    // proxies' registrations are cp-2's by then, so nothing is removed. Keep the load going
    // past that.
    for l in &loads {
        let sent = l.sent();
        l.wait_sent(sent + 30).await;
    }
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(2)).await;
    for (p, (versions, updates)) in proxies.iter().zip(&before) {
        assert_eq!(&p.versions().await, versions, "{} changed config", p.id());
        assert_eq!(
            config_updates(p).await,
            *updates,
            "{} was pushed config when it moved to cp-2",
            p.id()
        );
        let dump = p.config_dump().await;
        let reconnects = &dump["control_plane"]["reconnects"];
        assert!(
            reconnects["stream_error"].as_u64().unwrap_or(0)
                + reconnects["stream_closed"].as_u64().unwrap_or(0)
                >= 1,
            "{}: {}",
            p.id(),
            dump["control_plane"]
        );
        let m = p.metrics().await;
        assert_eq!(
            m.get(
                "weft_control_plane_connected",
                &[("address", &cps[1].grpc_addr.to_string())]
            ),
            Some(1.0),
            "{}: {}",
            p.id(),
            m.lines_for("weft_control_plane_connected")
        );
    }
    assert_eq!(
        (pushes(&cps[1]).await, pushes(&cps[2]).await),
        pushed_before,
        "a replica pushed something to proxies that moved with nothing new"
    );
    for id in ["api-1", "api-2", "web-1", "web-2"] {
        let stored: serde_json::Value = serde_json::from_str(
            &mesh
                .etcd
                .value(&format!("/weft/registrations/{id}"))
                .unwrap_or_else(|| panic!("etcd lost {id}'s registration")),
        )
        .unwrap();
        assert_eq!(stored["replica"], "cp-2", "{id}: {stored}");
    }

    // Pushes go on from the new replica: an apply through cp-3 reaches every proxy.
    apply(
        &cps[2],
        &mesh.file("more.yaml", &http_services_yaml(&["more"])),
    )
    .await;
    for p in proxies {
        wait_cluster(p, "more").await;
    }
    assert!(pushes(&cps[1]).await > pushed_before.0);
    let [l1, l2] = loads;
    let r1 = no_failures(l1, "load through web-1 while its replica died").await;
    let r2 = no_failures(l2, "load through web-2 while its replica died").await;
    assert!(r1.records.len() + r2.records.len() >= 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_on_three_replicas_lose_nothing() {
    let (mesh, cps) = start(|_| {}).await;
    let web = caller(&[&cps[2], &cps[0], &cps[1]], "web", "web-1").await;
    let mut conflicts = Vec::new();
    let mut serial_rounds = 0;
    let mut applied = vec!["mesh.yaml".to_owned()];
    let mut services = Vec::new();
    for round in 0..15 {
        if !conflicts.is_empty() && round >= 3 {
            break;
        }
        let files: Vec<(String, String)> = ["a", "b", "c"]
            .iter()
            .map(|x| {
                let service = format!("{x}{round}");
                let name = format!("r{round}-{x}.yaml");
                (
                    name.clone(),
                    mesh.file(&name, &http_services_yaml(&[&service])),
                )
            })
            .collect();
        let args: Vec<[&str; 3]> = files.iter().map(|(_, f)| ["apply", "-f", f]).collect();
        let (oa, ob, oc) = tokio::join!(
            weftctl(&cps[0], &args[0]),
            weftctl(&cps[1], &args[1]),
            weftctl(&cps[2], &args[2])
        );
        let mut lost_this_round = 0;
        for (i, (out, desc)) in [oa, ob, oc].into_iter().enumerate() {
            let (name, file) = &files[i];
            if !out.status.success() {
                // The loser wrote nothing and is told the revision to re-read.
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                let revision = stderr
                    .split("re-read revision ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<i64>().ok());
                assert!(
                    stderr.contains("conflict") && revision.is_some_and(|r| r > 0),
                    "{desc}"
                );
                conflicts.push(stderr);
                lost_this_round += 1;
                apply(&cps[i], file).await;
            }
            applied.push(name.clone());
            services.push(format!("{}{round}", ["a", "b", "c"][i]));
        }
        if lost_this_round == 0 {
            serial_rounds += 1;
        }
    }
    assert!(
        !conflicts.is_empty(),
        "15 rounds of three concurrent applies through three replicas never conflicted \
         ({serial_rounds} rounds where all three succeeded one after the other)"
    );
    for cp in &cps[1..] {
        wait_same_policies(cp, &cps[0]).await;
    }
    applied.sort();
    for cp in &cps {
        let mut files: Vec<String> = cp.policies().await["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["name"].as_str().map(str::to_owned))
            .collect();
        files.sort();
        assert_eq!(files, applied, "{} serves another set", cp.admin_addr);
    }
    let in_etcd = mesh
        .etcd
        .keys("/weft/policies/")
        .into_iter()
        .filter(|k| k.ends_with(".yaml"))
        .count();
    assert_eq!(in_etcd, applied.len());
    for service in &services {
        wait_cluster(&web, service).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_registrations_survive_a_restart_of_everything() {
    // A grace long enough that a paused proxy stays registered through the restart, and a
    // lease TTL longer than stopping the three replicas and etcd takes on a busy machine: the
    // last replica's lease must not expire (deleting its keys) before etcd stops. etcd gives
    // every lease its whole TTL again when it comes back.
    let (mut mesh, mut cps) = start(|mesh| {
        mesh.deregister_grace = Duration::from_secs(30);
        mesh.lease_ttl = Duration::from_secs(10);
    })
    .await;
    let api1 = instance(&[&cps[0], &cps[1], &cps[2]], "api", "api-1").await;
    let web1 = caller(&[&cps[1], &cps[2], &cps[0]], "web", "web-1").await;
    wait_for_instance(&web1.http1(), "api", "/", "api-1").await;
    let mut before = Vec::new();
    for cp in &cps {
        before.push(served(cp).await);
    }
    assert!(before.iter().all(|b| *b == before[0]), "{before:?}");
    let configs: Vec<_> = cps.iter().map(|cp| cp.config.clone()).collect();

    // Everything stops: replicas (SIGTERM), then etcd. The proxies keep serving.
    cps.clear();
    mesh.etcd.stop_all();
    let t = tally(&web1.http1(), "api", "/", 20).await;
    assert_eq!(t.count("api-1"), 20, "{t:?}");
    // api-1's sidecar cannot reconnect while paused: whatever lists it after the restart
    // read it from etcd.
    pause(api1.proxy.process.pid());
    mesh.etcd.restart_all().await;
    for config in configs {
        cps.push(ControlPlane::start_with(config).await);
    }
    for cp in &cps {
        assert_eq!(served(cp).await, before[0], "the policies survived");
        wait_until(
            DEFAULT_WAIT,
            &format!("{} lists api-1 from etcd", cp.admin_addr),
            async || proxy_status(cp, "api-1").await.ok_or("not listed"),
        )
        .await;
    }
    // A caller that starts now (on cp-3) gets api-1's endpoint: the registration came back
    // from etcd, not from the proxy.
    let web2 = caller(&[&cps[2], &cps[0], &cps[1]], "web", "web-2").await;
    web2.wait_endpoint(api1.endpoint(), true).await;
    // web-1 reconnected (to whichever replica was up first) with what it held and still has
    // it.
    wait_connected(&web1).await;
    web1.wait_endpoint(api1.endpoint(), true).await;

    resume(api1.proxy.process.pid());
    wait_connected(&api1.proxy).await;
    wait_for_instance(&web2.http1(), "api", "/", "api-1").await;
    wait_for_instance(&web1.http1(), "api", "/", "api-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_replicas_serve_their_last_state_and_recover_without_restarts() {
    let (mut mesh, cps) = start(|_| {}).await;
    let (cp1, cp2, cp3) = (&cps[0], &cps[1], &cps[2]);
    // api-1 on cp-1, web-1 on cp-3: the caller's endpoint comes through etcd.
    let api1 = instance(&[cp1, cp2, cp3], "api", "api-1").await;
    let web1 = caller(&[cp3, cp1, cp2], "web", "web-1").await;
    wait_for_instance(&web1.http1(), "api", "/", "api-1").await;
    let traffic = load(&web1);
    traffic.wait_sent(30).await;

    mesh.etcd.stop_all();
    // Applies fail with a clear error naming etcd.
    let (out, desc) = weftctl(
        cp2,
        &[
            "apply",
            "-f",
            &mesh.file("more.yaml", &http_services_yaml(&["more"])),
        ],
    )
    .await;
    assert!(!out.status.success(), "{desc}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unavailable") && stderr.contains("etcd"),
        "{desc}"
    );
    let r = cp1
        .put("/v1/policies/more.yaml", "services: [{name: more}]\n")
        .await;
    assert_eq!(r.status, 503, "{}", r.summary());
    // Replicas serve their last state: a caller starting now on cp-2 gets api-1 (cp-1's
    // registration, as cp-2 last saw it), an instance starting on cp-3 is an endpoint for
    // web-1 there.
    let web2 = caller(&[cp2, cp3, cp1], "web", "web-2").await;
    wait_for_instance(&web2.http1(), "api", "/", "api-1").await;
    let api2 = instance(&[cp3, cp1, cp2], "api", "api-2").await;
    wait_for_instance(&web1.http1(), "api", "/", "api-2").await;

    mesh.etcd.restart_all().await;
    // Without restarting anything: the registration made during the outage reaches etcd and
    // the other replicas, and applies work again and reach every proxy.
    for cp in [cp1, cp2] {
        wait_until(
            DEFAULT_WAIT,
            &format!("{} lists api-2", cp.admin_addr),
            async || proxy_status(cp, "api-2").await.ok_or("not yet"),
        )
        .await;
    }
    assert!(mesh.etcd.value("/weft/registrations/api-2").is_some());
    wait_until(DEFAULT_WAIT, "an apply succeeds again", async || {
        let (out, desc) = weftctl(
            cp2,
            &[
                "apply",
                "-f",
                &mesh.file("more.yaml", &http_services_yaml(&["more"])),
            ],
        )
        .await;
        if out.status.success() {
            Ok(())
        } else {
            Err(desc)
        }
    })
    .await;
    for cp in [cp1, cp3] {
        wait_same_policies(cp, cp2).await;
    }
    for p in [&api1.proxy, &api2.proxy, &web1, &web2] {
        wait_cluster(p, "more").await;
    }
    // web-2 (cp-2) reaches api-2 (cp-3) through etcd again.
    wait_for_instance(&web2.http1(), "api", "/", "api-2").await;
    no_failures(traffic, "load through web-1 across the etcd outage").await;
}
