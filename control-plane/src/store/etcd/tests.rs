//! The etcd store against a real etcd (testkit starts `etcd` on loopback): the policies'
//! compare-and-swap and watch, registrations shared between replicas under leases, the shared
//! CA record, and an unreachable etcd.

use std::sync::Arc;
use std::time::Duration;

use weft_testkit::etcd::Etcd;

use super::ca::{CaCheck, CaFingerprint};
use super::*;
use crate::metrics::Metrics;
use crate::state::{ControlPlane, ProxyState};
use crate::store::SharedStore;
use crate::testing::node;

const GRACE: Duration = Duration::from_millis(500);

async fn store_at(endpoints: Vec<String>, replica: &str) -> Arc<EtcdStore> {
    let mut config = EtcdConfig::new(endpoints, replica);
    config.prefix = "/t".to_owned();
    config.lease_ttl = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(2);
    Arc::new(EtcdStore::connect(config).await.unwrap())
}

async fn store(etcd: &Etcd, replica: &str) -> Arc<EtcdStore> {
    store_at(vec![etcd.endpoint(0)], replica).await
}

fn control_plane(store: &Arc<EtcdStore>) -> Arc<ControlPlane> {
    Arc::new(ControlPlane::new(
        Arc::clone(store) as SharedStore,
        GRACE,
        Metrics::new().unwrap(),
    ))
}

/// A replica: its control plane with the registration sync running.
struct Replica {
    store: Arc<EtcdStore>,
    cp: Arc<ControlPlane>,
    sync: tokio::task::JoinHandle<()>,
}

async fn replica(etcd: &Etcd, name: &str) -> Replica {
    let store = store(etcd, name).await;
    let cp = control_plane(&store);
    store
        .load_registrations(Arc::clone(&cp) as _)
        .await
        .unwrap();
    let sync = {
        let (store, cp) = (Arc::clone(&store), Arc::clone(&cp));
        tokio::spawn(async move { store.sync_registrations(cp).await })
    };
    Replica { store, cp, sync }
}

/// Polls `probe` every 50 ms for up to `within`; panics naming `what`.
async fn eventually(within: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !probe() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of(cp: &ControlPlane, id: &str) -> Option<(ProxyState, Option<String>)> {
    cp.proxy_statuses()
        .into_iter()
        .find(|s| s.id == id)
        .map(|s| (s.state, s.replica))
}

#[tokio::test]
async fn a_write_validated_against_an_old_revision_conflicts_and_writes_nothing() {
    let etcd = Etcd::start().await;
    let s = store(&etcd, "a").await;
    let empty = s.read_policies().await.unwrap();
    assert_eq!((empty.files.len(), empty.revision), (0, Some(0)));

    let base = s
        .write_policies(
            Some(0),
            &[("a.yaml".into(), Some("services: [{name: a}]\n".into()))],
        )
        .await
        .unwrap();
    let read = s.read_policies().await.unwrap();
    assert_eq!(read.revision, base);
    assert_eq!(read.files.len(), 1, ".meta is no policy file");

    // Two writers read `base`; the first wins, the second is told the revision to re-read.
    let won = s
        .write_policies(
            base,
            &[("b.yaml".into(), Some("services: [{name: b}]\n".into()))],
        )
        .await
        .unwrap();
    let lost = s
        .write_policies(
            base,
            &[("c.yaml".into(), Some("services: [{name: c}]\n".into()))],
        )
        .await
        .unwrap_err();
    match lost {
        StoreError::Conflict { base: b, current } => {
            assert_eq!(Some(b), base);
            assert_eq!(Some(current), won);
        }
        other => panic!("expected a conflict, got {other}"),
    }
    let names: Vec<String> = s
        .read_policies()
        .await
        .unwrap()
        .files
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["a.yaml", "b.yaml"]);

    // A removal moves the revision too (through .meta): a writer that read before it conflicts.
    let before_removal = s.read_policies().await.unwrap().revision;
    s.write_policies(before_removal, &[("b.yaml".into(), None)])
        .await
        .unwrap();
    assert!(matches!(
        s.write_policies(before_removal, &[("a.yaml".into(), None)])
            .await,
        Err(StoreError::Conflict { .. })
    ));

    // etcdctl, etcd's own client, reads what was written.
    assert_eq!(
        etcd.value("/t/policies/a.yaml").as_deref(),
        Some("services: [{name: a}]\n")
    );
    assert_eq!(etcd.value("/t/policies/b.yaml"), None);
    let meta: serde_json::Value =
        serde_json::from_str(&etcd.value("/t/policies/.meta").unwrap()).unwrap();
    assert_eq!(meta["replica"], "a");
    assert_eq!(meta["files"][0]["name"], "b.yaml");
}

#[tokio::test]
async fn concurrent_applies_through_two_replicas_lose_nothing() {
    let etcd = Etcd::start().await;
    let (a, b) = (store(&etcd, "a").await, store(&etcd, "b").await);
    let (cpa, cpb) = (control_plane(&a), control_plane(&b));
    let mut pending: Vec<(Arc<ControlPlane>, String)> = (0..8)
        .map(|i| {
            let cp = if i % 2 == 0 { &cpa } else { &cpb };
            (Arc::clone(cp), format!("s{i}.yaml"))
        })
        .collect();
    let mut conflicts = 0;
    for _round in 0..20 {
        if pending.is_empty() {
            break;
        }
        let attempts = pending.iter().map(|(cp, name)| {
            let (cp, name) = (Arc::clone(cp), name.clone());
            let service = name.trim_end_matches(".yaml").to_owned();
            async move {
                let content = format!("services: [{{name: {service}}}]\n");
                let r = cp.apply(&name, Some(&content), false).await;
                (cp, name, r)
            }
        });
        let results = futures::future::join_all(attempts).await;
        pending.clear();
        for (cp, name, r) in results {
            match r {
                Ok(_) => {}
                Err(crate::state::ApplyError::Store(StoreError::Conflict { .. })) => {
                    conflicts += 1;
                    pending.push((cp, name));
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }
    assert!(pending.is_empty(), "still conflicting after 20 rounds");
    assert!(conflicts > 0, "8 concurrent applies never conflicted");
    let files = a.read_policies().await.unwrap().files;
    assert_eq!(files.len(), 8, "an apply was lost: {files:?}");
}

#[tokio::test]
async fn every_replica_reloads_what_another_applied() {
    let etcd = Etcd::start().await;
    let (a, b) = (store(&etcd, "a").await, store(&etcd, "b").await);
    let (cpa, cpb) = (control_plane(&a), control_plane(&b));
    let _watch = crate::watch::spawn_watcher(Arc::clone(&cpb)).unwrap();
    cpb.reload().await.unwrap();
    let applied = cpa
        .apply("a.yaml", Some("services: [{name: a}]\n"), false)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "replica b serves a's apply", || {
        cpb.policy().version() == applied.version
    })
    .await;
    assert_eq!(cpb.policy_revision(), applied.revision);
    assert_eq!(cpa.policy_revision(), applied.revision);
}

#[tokio::test]
async fn registrations_reach_every_replica_and_expire_with_their_replicas_lease() {
    let etcd = Etcd::start().await;
    let a = replica(&etcd, "a").await;
    let b = replica(&etcd, "b").await;
    let session =
        a.cp.connect(&node("web-1", "web", "127.0.0.2:15006"))
            .unwrap();

    eventually(Duration::from_secs(5), "b lists a's proxy", || {
        state_of(&b.cp, "web-1") == Some((ProxyState::Connected, Some("a".into())))
    })
    .await;
    let key = etcd.value("/t/registrations/web-1").expect("the key");
    let stored: serde_json::Value = serde_json::from_str(&key).unwrap();
    assert_eq!(stored["inbound_address"], "127.0.0.2:15006");
    assert_eq!(stored["replica"], "a");
    b.cp.with_registry(|r| {
        let p = r.get("web-1").unwrap();
        assert!(p.is_remote());
        assert_eq!(p.node.inbound_address, "127.0.0.2:15006");
    });

    // A log level set through b reaches a's registration (a pushes it).
    b.cp.set_log_level("web-1", "debug").await.unwrap();
    eventually(Duration::from_secs(5), "a got the log level", || {
        a.cp.with_registry(|r| r.get("web-1").and_then(|p| p.log_level.clone()))
            == Some("debug".into())
    })
    .await;

    // A proxy that disconnects is removed everywhere when its grace ends on its replica.
    a.cp.disconnect("web-1", session);
    eventually(Duration::from_secs(5), "b sees it disconnected", || {
        state_of(&b.cp, "web-1").is_some_and(|(s, _)| s == ProxyState::Disconnected)
    })
    .await;
    eventually(Duration::from_secs(5), "its grace ends", || {
        a.cp.expire_registrations();
        b.cp.expire_registrations();
        state_of(&b.cp, "web-1").is_none() && etcd.value("/t/registrations/web-1").is_none()
    })
    .await;

    // Replica a dies (its lease is no longer kept alive) with a proxy connected: b keeps the
    // endpoint for the lease TTL, then the grace.
    a.cp.connect(&node("api-1", "api", "127.0.0.3:15006"))
        .unwrap();
    eventually(Duration::from_secs(5), "b lists api-1", || {
        state_of(&b.cp, "api-1").is_some()
    })
    .await;
    a.sync.abort();
    let died = tokio::time::Instant::now();
    eventually(Duration::from_secs(8), "the lease expires", || {
        b.cp.expire_registrations();
        state_of(&b.cp, "api-1").is_some_and(|(s, _)| s == ProxyState::Disconnected)
    })
    .await;
    // The last keep-alive was at most TTL/3 before the abort.
    assert!(
        died.elapsed() >= Duration::from_millis(1200),
        "before the lease TTL"
    );
    eventually(Duration::from_secs(3), "the grace ends", || {
        b.cp.expire_registrations();
        state_of(&b.cp, "api-1").is_none()
    })
    .await;
    drop(a.store);
    b.sync.abort();
}

#[tokio::test]
async fn a_proxy_that_moves_to_another_replica_keeps_its_endpoint() {
    let etcd = Etcd::start().await;
    let a = replica(&etcd, "a").await;
    let b = replica(&etcd, "b").await;
    let session =
        a.cp.connect(&node("web-1", "web", "127.0.0.2:15006"))
            .unwrap();
    eventually(Duration::from_secs(5), "b lists it", || {
        state_of(&b.cp, "web-1").is_some()
    })
    .await;

    // Its stream to a ends, and it reconnects to b within the grace.
    a.cp.disconnect("web-1", session);
    b.cp.connect(&node("web-1", "web", "127.0.0.2:15006"))
        .unwrap();
    eventually(Duration::from_secs(5), "a sees it on b", || {
        state_of(&a.cp, "web-1") == Some((ProxyState::Connected, Some("b".into())))
    })
    .await;
    // a's grace ends without removing b's registration.
    tokio::time::sleep(GRACE * 2).await;
    a.cp.expire_registrations();
    b.cp.expire_registrations();
    assert_eq!(
        state_of(&b.cp, "web-1"),
        Some((ProxyState::Connected, Some("b".into())))
    );
    let stored: serde_json::Value =
        serde_json::from_str(&etcd.value("/t/registrations/web-1").unwrap()).unwrap();
    assert_eq!(stored["replica"], "b");
    assert!(stored.get("remove_at_unix_ms").is_none());
    a.sync.abort();
    b.sync.abort();
}

#[tokio::test]
async fn registrations_come_back_after_etcd_restarts() {
    let mut etcd = Etcd::start().await;
    let a = replica(&etcd, "a").await;
    let b = replica(&etcd, "b").await;
    a.cp.connect(&node("web-1", "web", "127.0.0.2:15006"))
        .unwrap();
    eventually(Duration::from_secs(5), "b lists it", || {
        state_of(&b.cp, "web-1").is_some()
    })
    .await;

    etcd.stop(0);
    // Meanwhile: replicas keep what they have; an apply fails naming etcd.
    let err =
        a.cp.apply("a.yaml", Some("services: [{name: a}]\n"), false)
            .await
            .unwrap_err();
    assert!(
        matches!(
            &err,
            crate::state::ApplyError::Store(StoreError::Unavailable { store, .. }) if store.starts_with("etcd http://")
        ),
        "{err}"
    );
    a.cp.connect(&node("api-1", "api", "127.0.0.3:15006"))
        .unwrap();
    assert!(state_of(&b.cp, "web-1").is_some());

    etcd.restart(0).await;
    eventually(
        Duration::from_secs(15),
        "b lists the proxy a got meanwhile",
        || state_of(&b.cp, "api-1").is_some(),
    )
    .await;
    assert!(state_of(&b.cp, "web-1").is_some());
    a.cp.apply("a.yaml", Some("services: [{name: a}]\n"), false)
        .await
        .unwrap();
    a.sync.abort();
    b.sync.abort();
}

#[tokio::test]
async fn the_first_replica_records_the_ca_and_a_different_one_is_refused() {
    let etcd = Etcd::start().await;
    let s = store(&etcd, "a").await;
    let ca = |dir: &std::path::Path| {
        crate::ca::Ca::load_or_create(&crate::ca::CaConfig::new(dir)).unwrap()
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = CaFingerprint::of(&ca(d1.path())).unwrap();
    assert_eq!(s.check_ca(&first).await.unwrap(), CaCheck::Recorded);
    assert_eq!(
        store(&etcd, "b").await.check_ca(&first).await.unwrap(),
        CaCheck::Same {
            replica: "a".into()
        }
    );
    let other = CaFingerprint::of(&ca(d2.path())).unwrap();
    let CaCheck::Differs(message) = s.check_ca(&other).await.unwrap() else {
        panic!("another CA was accepted")
    };
    assert!(message.contains("root certificate sha256"), "{message}");
    assert!(message.contains("token.key"), "{message}");
    assert!(message.contains("etcdctl del /t/ca"), "{message}");
}

/// The TCP connections this host holds open (established, or closed by the peer but not yet
/// by us) to `peer`, from `/proc/net/tcp`: each line, and the processes holding it.
fn open_connections_to(peer: std::net::SocketAddr) -> Vec<(String, Vec<(u32, String)>)> {
    // Fields: "sl local rem st ...", addresses as hex `ip:port`, the IP in memory order.
    let parse = |field: &str| -> Option<std::net::SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
        let port = u16::from_str_radix(port, 16).ok()?;
        Some((std::net::Ipv4Addr::from(ip), port).into())
    };
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // 01: ESTABLISHED, 08: CLOSE_WAIT.
            let open = f.len() > 3 && parse(f[2]) == Some(peer) && matches!(f[3], "01" | "08");
            let inode = f.get(9).copied().unwrap_or("?");
            open.then(|| (line.trim().to_owned(), socket_holders(inode)))
        })
        .collect()
}

/// Which processes hold the socket `inode` open: their pids and names.
fn socket_holders(inode: &str) -> Vec<(u32, String)> {
    let target = format!("socket:[{inode}]");
    let mut holders = Vec::new();
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = proc_dir.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if holds {
            let comm = std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
            holders.push((pid, comm.trim().to_owned()));
        }
    }
    holders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_member_killed_every_request_goes_to_the_others() {
    // A 3-member cluster, the client given all three; one follower is killed (SIGKILL, so its
    // port refuses at once). Once the client has seen the member's connections close, every
    // apply and read succeeds at its first try: the dead member's requests go to the others
    // ([`members`]), before and after the probe takes it out of the balancer. (A follower:
    // killing the leader makes etcd itself answer "leader changed" until it elects another,
    // which is not what this test is about; the leader's death is tests/ha_faults.rs's.)
    //
    // Not before: a request written on a connection whose end the client has not read yet
    // fails ("broken pipe", "connection reset") with no way for the client to know whether
    // the member got it, so it is not sent again (it may have been applied) and the caller
    // sees etcd unavailable, as after any member's crash.
    let mut etcd = Etcd::start_cluster(3).await;
    let endpoints: Vec<String> = (0..3).map(|i| etcd.endpoint(i)).collect();
    let s = store_at(endpoints, "a").await;
    s.write_policies(None, &[("a.yaml".into(), Some("services: []\n".into()))])
        .await
        .unwrap();
    let victim = (etcd.wait_leader().await + 1) % 3;
    let victim_addr: std::net::SocketAddr = etcd
        .endpoint(victim)
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    assert!(
        open_connections_to(victim_addr)
            .iter()
            .any(|(_, holders)| holders.iter().any(|(pid, _)| *pid == std::process::id())),
        "the client has no connection to member {victim} ({victim_addr}) to lose"
    );
    etcd.kill(victim);
    // The client has seen the member die once each of its connections to it has read the end
    // (or was dropped). The balancer moves a connection on (a connect, its handshake, a
    // removal) only while it handles a request, so reads are sent meanwhile: they may fail (one
    // written on a connection whose end was not read yet) and are not what this test asserts.
    let mut unasserted = Vec::new();
    weft_testkit::wait_until(
        Duration::from_secs(10),
        &format!("the client closed its connections to the killed member {victim_addr}"),
        async || {
            if let Err(e) = s.read_policies().await {
                assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
                unasserted.push(e.to_string());
            }
            let open = open_connections_to(victim_addr);
            if open.is_empty() {
                Ok(())
            } else {
                Err(format!("still open: {open:?}"))
            }
        },
    )
    .await;
    eprintln!("reads failed while the client found the member dead: {unasserted:?}");
    let mut revision = s.read_policies().await.unwrap().revision;
    for i in 0..40 {
        let next = s
            .write_policies(
                revision,
                &[("a.yaml".into(), Some(format!("# {i}\nservices: []\n")))],
            )
            .await
            .unwrap_or_else(|e| panic!("write {i} with member {victim} dead: {e}"));
        let read = s
            .read_policies()
            .await
            .unwrap_or_else(|e| panic!("read {i} with member {victim} dead: {e}"));
        assert_eq!(read.revision, next, "read {i}");
        assert!(read.files[0].content.starts_with(&format!("# {i}\n")));
        revision = next;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn an_unreachable_etcd_is_unavailable_within_the_timeout() {
    // Nothing listens there.
    let addr = weft_testkit::free_addr(weft_testkit::next_loopback_ip());
    let s = store_at(vec![format!("http://{addr}")], "a").await;
    // It returns (the test would hang otherwise) with an error naming etcd; how fast is not
    // asserted (no wall-clock thresholds).
    let err = s.read_policies().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("etcd http://"), "{err}");
}

#[test]
fn configs_are_checked() {
    let ok = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()], "a");
    assert!(ok.validate().is_ok());
    for (bad, says) in [
        (EtcdConfig::new(vec![], "a"), "at least one"),
        (
            EtcdConfig::new(vec!["127.0.0.1:2379".into()], "a"),
            "expected http://",
        ),
        (
            EtcdConfig::new(vec!["https://e:2379".into()], "a"),
            "--etcd-ca",
        ),
        (
            EtcdConfig {
                prefix: "weft/".into(),
                ..ok.clone()
            },
            "--etcd-prefix",
        ),
        (
            EtcdConfig {
                lease_ttl: Duration::from_millis(1500),
                ..ok
            },
            "--etcd-lease-ttl",
        ),
        (
            EtcdConfig::new(vec!["http://e:1".into()], "a b"),
            "--replica-id",
        ),
    ] {
        let e = bad.validate().unwrap_err();
        assert!(e.contains(says), "{e}");
    }
}
