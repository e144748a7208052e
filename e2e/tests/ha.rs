//! Several control-plane replicas on one real etcd (`etcd` started by the test on loopback):
//! policies applied through one replica are served by every replica at the same revision, a
//! proxy's registration reaches every replica (a caller on one replica reaches an instance on
//! another) and replicas push identical versions, a killed replica's proxies disappear after its
//! lease TTL plus the grace, a replica with another CA refuses to start, and a proxy whose
//! bootstrap names the replicas by one DNS name with several addresses moves to another
//! address when its replica dies.
//!
//! The fault scenarios on a 3-member etcd with 3 replicas (etcd leader killed, the proxies'
//! replica killed, concurrent applies, restart of everything, etcd down) are in `ha_faults.rs`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_e2e::{
    caller_proxy, http_services_yaml, proxy_status, wait_for_instance, weftctl, Instance, LoadSpec,
    MixedLoad,
};
use weft_testkit::replicas::{
    free_port_on_all, hosts_file, served, wait_same_policies, with_hosts_file, Mesh, LEASE_TTL,
};
use weft_testkit::security::{join_token, roots_pem};
use weft_testkit::{
    bin_path, free_addr, loopback_ips, next_loopback_ip, wait_until, ControlPlane, DemoApp,
    ProcessGuard, Proxy, ProxyConfig, DEFAULT_WAIT,
};

/// `weftctl apply -f <file>` through `cp`, which must succeed.
async fn apply(cp: &ControlPlane, file: &str) {
    let (out, desc) = weftctl(cp, &["apply", "-f", file]).await;
    assert!(out.status.success(), "{desc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_the_same_policies_and_every_registration() {
    let mesh = Mesh::start(1).await;
    let mut cp1 = mesh.replica("cp-1").await;
    let cp2 = mesh.replica("cp-2").await;
    apply(
        &cp1,
        &mesh.file("mesh.yaml", &http_services_yaml(&["web", "api"])),
    )
    .await;
    wait_same_policies(&cp2, &cp1).await;
    assert_eq!(served(&cp1).await, served(&cp2).await);

    // An instance registered on cp-1 is an endpoint for a caller on cp-2.
    let _api = Instance::http(&cp1, "api", "api-1").await;
    let web1 = caller_proxy(&cp2, "web", "web-1").await;
    wait_for_instance(&web1.http1(), "api", "/", "api-1").await;
    let status = proxy_status(&cp2, "api-1").await.expect("cp-2 lists api-1");
    assert_eq!(status["replica"], "cp-1", "{status}");
    assert_eq!(status["state"], "connected", "{status}");
    let keys = mesh.etcd.keys("/weft/registrations/");
    assert_eq!(
        keys,
        ["/weft/registrations/api-1", "/weft/registrations/web-1"],
        "etcdctl lists the registrations"
    );
    let stored: serde_json::Value =
        serde_json::from_str(&mesh.etcd.value("/weft/registrations/web-1").unwrap()).unwrap();
    assert_eq!(stored["replica"], "cp-2");
    assert_eq!(stored["service"], "web");

    // Two proxies of one service on two replicas are pushed the same versions.
    let web2 = caller_proxy(&cp1, "web", "web-2").await;
    wait_for_instance(&web2.http1(), "api", "/", "api-1").await;
    let (v1, v2) = (web1.versions().await, web2.versions().await);
    assert_eq!(
        (&v1.routes, &v1.clusters, &v1.policies, &v1.trust),
        (&v2.routes, &v2.clusters, &v2.policies, &v2.trust),
        "web-1 (cp-2) and web-2 (cp-1) hold different versions: {v1:?} {v2:?}"
    );

    // cp-1 dies: its proxies' registrations go after the lease TTL plus the grace (1s).
    cp1.process.kill();
    let killed = Instant::now();
    wait_until(
        DEFAULT_WAIT,
        "cp-2 no longer lists api-1, whose replica died",
        async || match proxy_status(&cp2, "api-1").await {
            None => Ok(()),
            Some(s) => Err(s.to_string()),
        },
    )
    .await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after >= LEASE_TTL / 2,
        "api-1 went {gone_after:?} after its replica died, before its lease could expire (its last keep-alive was at most TTL/3 earlier)"
    );
    // And callers lose the endpoint.
    wait_until(DEFAULT_WAIT, "web-1 has no api endpoint left", async || {
        let r = web1
            .http1()
            .get("api", "/")
            .await
            .map_err(|e| e.to_string())?;
        if r.status == 503 {
            Ok(())
        } else {
            Err(r.summary())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_ca_refuses_to_start() {
    let mesh = Mesh::start(1).await;
    let _cp1 = mesh.replica("cp-1").await;
    let other_ca = tempfile::tempdir().unwrap();
    let mut config = mesh.config("cp-2");
    let mut cmd = std::process::Command::new(bin_path("weft-control"));
    cmd.arg("--ca-dir")
        .arg(other_ca.path())
        .arg("--grpc")
        .arg("127.0.0.1:0")
        .arg("--admin")
        .arg("127.0.0.1:0")
        .args(std::mem::take(&mut config.extra_args));
    let mut p = ProcessGuard::spawn("weft-control-other-ca", cmd);
    let status = p.wait_exit(DEFAULT_WAIT).await;
    assert!(!status.success(), "{}", p.describe());
    let log = p.log();
    assert!(
        log.contains("refusing to start")
            && log.contains("not the one the replicas of this mesh share"),
        "{}",
        p.describe()
    );
}

/// The DNS name the replicas of the test below share.
const CP_NAME: &str = "cp.weft.test";

/// A proxy bootstrap reaching the replicas as `https://cp.weft.test:<port>`, run in a mount
/// namespace whose `/etc/hosts` gives that name every replica's address.
fn by_name(
    mesh: &Mesh,
    hosts: &std::path::Path,
    port: u16,
    service: &str,
    id: &str,
    app: SocketAddr,
) -> ProxyConfig {
    let mut config = ProxyConfig::new(&format!("https://{CP_NAME}:{port}"), service, id, app);
    config.control_plane_ca = Some(roots_pem(mesh.ca_dir()));
    config.join_token = Some(join_token(mesh.ca_dir(), service, "default"));
    with_hosts_file(&mut config, hosts);
    config
}

/// The address `proxy`'s discovery stream is open to (`/config_dump` `control_plane`), if open.
async fn connected_to(proxy: &Proxy) -> Option<String> {
    let cp = &proxy.config_dump().await["control_plane"];
    (cp["connected"] == true).then(|| cp["address"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_with_several_replicas_is_failed_over() {
    let mut mesh = Mesh::start(1).await;
    mesh.deregister_grace = Duration::from_secs(1);
    // Two replicas on the same port at two addresses, both certified for the one name.
    let ips = loopback_ips(2);
    let port = free_port_on_all(&ips);
    let mut replicas = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let mut config = mesh.config(&format!("cp-{}", i + 1));
        config.grpc = Some(SocketAddr::new(*ip, port));
        config
            .extra_args
            .extend(["--tls-san".to_owned(), CP_NAME.to_owned()]);
        replicas.push(ControlPlane::start_with(config).await);
    }
    apply(
        &replicas[0],
        &mesh.file("mesh.yaml", &http_services_yaml(&["web", "api"])),
    )
    .await;
    wait_same_policies(&replicas[1], &replicas[0]).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), CP_NAME, &ips);

    let app = DemoApp::start("api", "api-1").await;
    let _api = Proxy::start_with(by_name(
        &mesh,
        &hosts,
        port,
        "api",
        "api-1",
        app.http_addr(),
    ))
    .await;
    let web = Proxy::start_with(by_name(
        &mesh,
        &hosts,
        port,
        "web",
        "web-1",
        free_addr(next_loopback_ip()),
    ))
    .await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
    let on = connected_to(&web).await.expect("web-1 is connected");
    let (dead, alive) = if on == replicas[0].grpc_addr.to_string() {
        (0, 1)
    } else {
        assert_eq!(
            on,
            replicas[1].grpc_addr.to_string(),
            "web-1 is on neither replica"
        );
        (1, 0)
    };
    let updates = web.metrics().await.sum("weft_config_updates_total", &[]);

    // Load through web-1 while its replica is killed.
    let load = MixedLoad::start(
        &LoadSpec {
            target: web.outbound_addr(),
            hosts: vec!["api".into()],
            tasks_per_kind: 1,
            max_per_task: 2_000,
            max_duration: Duration::from_secs(60),
            pause: Duration::from_millis(20),
            slow_every: 0,
            slow_ms: 0,
        },
        &std::sync::Arc::default(),
    );
    load.wait_sent(30).await;
    replicas[dead].process.kill();
    let other = replicas[alive].grpc_addr.to_string();
    wait_until(
        DEFAULT_WAIT,
        &format!("web-1 moved to the other address of {CP_NAME}, {other}"),
        async || match connected_to(&web).await {
            Some(a) if a == other => Ok(()),
            got => Err(format!("{got:?}")),
        },
    )
    .await;
    // Past the dead replica's lease TTL and the grace: nothing was removed meanwhile.
    let sent = load.sent();
    load.wait_sent(sent + 30).await;
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(1)).await;
    let report = load.finish().await;
    assert!(
        report.failures().is_empty(),
        "{}",
        report.describe_failures(5)
    );
    assert!(
        report.records.len() >= 60,
        "{} requests",
        report.records.len()
    );
    assert_eq!(
        web.metrics().await.sum("weft_config_updates_total", &[]),
        updates,
        "web-1 was pushed config when it moved: the replicas' versions differ"
    );
    let dump = web.config_dump().await;
    assert!(
        dump["control_plane"]["reconnects"]["stream_error"].as_u64() >= Some(1),
        "{}",
        dump["control_plane"]
    );
    assert_eq!(
        dump["control_plane"]["urls"][0],
        format!("https://{CP_NAME}:{port}")
    );
}
