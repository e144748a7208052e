//! Several control-plane replicas on one real etcd (`etcd` started by the test on loopback):
//! policies applied through one replica are served by every replica at the same revision,
//! concurrent applies through two replicas lose nothing (the loser is told to re-read), a
//! proxy's registration reaches every replica (a caller on one replica reaches an instance on
//! another), a killed replica's proxies disappear after its lease TTL plus the grace, a replica
//! with another CA refuses to start, everything restarts with its state, and an etcd outage
//! leaves the replicas serving and recovers without restarts.

use std::path::Path;
use std::time::{Duration, Instant};

use weft_e2e::{
    caller_proxy, http_services_yaml, proxy_status, tally, wait_for_instance, weftctl, Instance,
};
use weft_testkit::etcd::Etcd;
use weft_testkit::{
    bin_path, wait_until, ControlPlane, ControlPlaneConfig, PolicyDir, ProcessGuard, DEFAULT_WAIT,
};

/// The lease TTL of the replicas in these tests.
const LEASE_TTL: Duration = Duration::from_secs(2);

/// A replica named `name` on `etcd`, with the CA in `ca_dir` (shared by every replica).
fn replica_config(policies: &Path, ca_dir: &Path, etcd: &Etcd, name: &str) -> ControlPlaneConfig {
    let mut config = ControlPlaneConfig::new(policies);
    config.ca_dir = Some(ca_dir.to_path_buf());
    config.extra_args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd.endpoints(),
        "--etcd-lease-ttl",
        &format!("{}s", LEASE_TTL.as_secs()),
        "--etcd-timeout",
        "2s",
        "--replica-id",
        name,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    config
}

/// A mesh's shared parts: etcd, the CA directory every replica uses, an (unused) policy dir.
struct Mesh {
    etcd: Etcd,
    ca: tempfile::TempDir,
    policies: PolicyDir,
    files: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Mesh {
        Mesh {
            etcd: Etcd::start().await,
            ca: tempfile::tempdir().unwrap(),
            policies: PolicyDir::new(),
            files: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, name: &str) -> ControlPlaneConfig {
        replica_config(self.policies.path(), self.ca.path(), &self.etcd, name)
    }

    async fn replica(&self, name: &str) -> ControlPlane {
        ControlPlane::start_with(self.config(name)).await
    }

    /// Writes `yaml` to a file named `name` for `weftctl apply -f`; returns its path.
    fn file(&self, name: &str, yaml: &str) -> String {
        let path = self.files.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        path.display().to_string()
    }
}

/// `weftctl apply -f <file>` through `cp`, which must succeed.
async fn apply(cp: &ControlPlane, file: &str) {
    let (out, desc) = weftctl(cp, &["apply", "-f", file]).await;
    assert!(out.status.success(), "{desc}");
}

/// `GET /v1/policies`: (version, revision).
async fn served(cp: &ControlPlane) -> (String, Option<i64>) {
    let p = cp.policies().await;
    (
        p["version"].as_str().unwrap_or_default().to_owned(),
        p["revision"].as_i64(),
    )
}

/// Waits until `cp` and `reference` serve the same policies at the same revision.
async fn wait_same_policies(cp: &ControlPlane, reference: &ControlPlane) {
    wait_until(
        DEFAULT_WAIT,
        &format!(
            "the replicas at {} and {} serve the same policy revision",
            cp.admin_addr, reference.admin_addr
        ),
        async || {
            let (got, want) = (served(cp).await, served(reference).await);
            if got == want && want.1.is_some() {
                Ok(())
            } else {
                Err(format!("{got:?} and {want:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_the_same_policies_and_every_registration() {
    let mesh = Mesh::start().await;
    let mut cp1 = mesh.replica("cp-1").await;
    let cp2 = mesh.replica("cp-2").await;
    apply(
        &cp1,
        &mesh.file("mesh.yaml", &http_services_yaml(&["web", "api"])),
    )
    .await;
    wait_same_policies(&cp2, &cp1).await;

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
    assert!(
        gone_after <= LEASE_TTL + Duration::from_secs(1) + Duration::from_secs(4),
        "api-1 went {gone_after:?} after its replica died"
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
async fn concurrent_applies_on_two_replicas_lose_nothing() {
    let mesh = Mesh::start().await;
    let cp1 = mesh.replica("cp-1").await;
    let cp2 = mesh.replica("cp-2").await;
    let mut conflicts = Vec::new();
    let mut applied = Vec::new();
    for round in 0..15 {
        if !conflicts.is_empty() && round >= 3 {
            break;
        }
        let a = mesh.file(
            &format!("r{round}-a.yaml"),
            &http_services_yaml(&[&format!("a{round}")]),
        );
        let b = mesh.file(
            &format!("r{round}-b.yaml"),
            &http_services_yaml(&[&format!("b{round}")]),
        );
        let (args_a, args_b) = (["apply", "-f", a.as_str()], ["apply", "-f", b.as_str()]);
        let ((oa, da), (ob, db)) = tokio::join!(weftctl(&cp1, &args_a), weftctl(&cp2, &args_b));
        for (out, desc, cp, file) in [(oa, da, &cp1, a), (ob, db, &cp2, b)] {
            if out.status.success() {
                applied.push(file);
                continue;
            }
            // The loser is told the revision to re-read; applying again succeeds.
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                stderr.contains("conflict") && stderr.contains("re-read revision"),
                "{desc}"
            );
            conflicts.push(stderr);
            apply(cp, &file).await;
            applied.push(file);
        }
    }
    assert!(
        !conflicts.is_empty(),
        "15 rounds of concurrent applies through two replicas never conflicted"
    );
    wait_same_policies(&cp2, &cp1).await;
    let files = cp1.policies().await["files"].as_array().map_or(0, Vec::len);
    assert_eq!(files, applied.len(), "an apply was lost");
    let in_etcd = mesh
        .etcd
        .keys("/weft/policies/")
        .into_iter()
        .filter(|k| k.ends_with(".yaml"))
        .count();
    assert_eq!(in_etcd, applied.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_ca_refuses_to_start() {
    let mesh = Mesh::start().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_registrations_survive_a_restart_of_everything() {
    let mut mesh = Mesh::start().await;
    let cp1 = mesh.replica("cp-1").await;
    apply(
        &cp1,
        &mesh.file("mesh.yaml", &http_services_yaml(&["web", "api"])),
    )
    .await;
    let before = served(&cp1).await;
    let _api = Instance::http(&cp1, "api", "api-1").await;
    wait_until(DEFAULT_WAIT, "etcd holds api-1", async || {
        mesh.etcd
            .value("/weft/registrations/api-1")
            .ok_or("not yet")
    })
    .await;

    let config = cp1.config.clone();
    drop(cp1);
    mesh.etcd.stop_all();
    mesh.etcd.restart_all().await;
    let cp1 = ControlPlane::start_with(config).await;
    assert_eq!(served(&cp1).await, before, "the policies survived");
    // api-1's proxy reconnects to the restarted replica and holds its registration again.
    wait_until(
        DEFAULT_WAIT,
        "cp-1 lists api-1 connected to it",
        async || match proxy_status(&cp1, "api-1").await {
            Some(s)
                if s["state"] == "connected"
                    && s["replica"] == "cp-1"
                    && s["versions"].as_object().is_some_and(|v| !v.is_empty()) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let web = caller_proxy(&cp1, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_replicas_serve_their_last_state_and_recover_without_restarts() {
    let mut mesh = Mesh::start().await;
    let cp1 = mesh.replica("cp-1").await;
    let cp2 = mesh.replica("cp-2").await;
    apply(
        &cp1,
        &mesh.file("mesh.yaml", &http_services_yaml(&["web", "api"])),
    )
    .await;
    wait_same_policies(&cp2, &cp1).await;
    let _api1 = Instance::http(&cp1, "api", "api-1").await;
    let web = caller_proxy(&cp1, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    mesh.etcd.stop_all();
    // Traffic flows; an apply fails with a clear error naming etcd.
    let t = tally(&client, "api", "/", 20).await;
    assert_eq!(t.count("api-1"), 20, "{t:?}");
    let (out, desc) = weftctl(
        &cp1,
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
    // A proxy connecting meanwhile registers with its replica and gets traffic.
    let api2 = Instance::http(&cp1, "api", "api-2").await;
    web.wait_endpoint(api2.endpoint(), true).await;

    mesh.etcd.restart_all().await;
    // Without restarting anything: the registration made during the outage reaches etcd and
    // the other replica, and applies work again.
    wait_until(DEFAULT_WAIT, "cp-2 lists api-2", async || {
        proxy_status(&cp2, "api-2").await.ok_or("not yet")
    })
    .await;
    assert!(mesh.etcd.value("/weft/registrations/api-2").is_some());
    wait_until(DEFAULT_WAIT, "an apply succeeds again", async || {
        let (out, desc) = weftctl(
            &cp1,
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
    wait_same_policies(&cp2, &cp1).await;
}
