//! Policies from a Kubernetes ConfigMap volume: the real `weft-control --policies DIR` where
//! DIR is written the way the kubelet's atomic writer writes a ConfigMap (`..data` swapped to a
//! new timestamped directory, one symlink per key), and a real proxy whose traffic follows each
//! update: a changed key, a key added and one removed, and a broken update that keeps the last
//! good set. Each update is one reload of the whole version.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_control::store::file::atomic_writer::AtomicWriter;
use weft_e2e::{caller_proxy, tally, wait_for_instance, Instance};
use weft_testkit::{wait_until, ControlPlane, ControlPlaneConfig, DEFAULT_WAIT};

const SERVICES: &str =
    "services:\n  - name: web\n  - name: api\n  - name: api-a\n  - name: api-b\n";

fn route_to(service: &str) -> String {
    format!(
        "routes:\n  - name: api-route\n    service: api\n    destinations:\n      - {{service: {service}, weight: 100}}\n"
    )
}

/// One ConfigMap update: what it is, its keys, the instance "api" then reaches ("" = not
/// checked), and the policy files served after it.
type Update = (
    &'static str,
    BTreeMap<String, String>,
    &'static str,
    &'static [&'static str],
);

fn payload(files: &[(&str, String)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(n, c)| ((*n).to_owned(), c.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_volume_update_reaches_the_proxy_once_and_whole() {
    let volume = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let writer = AtomicWriter::new(volume.path());
    writer
        .write(&payload(&[
            ("00-services.yaml", SERVICES.to_owned()),
            ("10-routes.yaml", route_to("api-a")),
        ]))
        .unwrap();
    let mut config = ControlPlaneConfig::new(volume.path());
    // As the chart runs it: the registry's state outside the read-only volume.
    config.extra_args = vec!["--state-dir".into(), state.path().display().to_string()];
    let cp = ControlPlane::start_with(config).await;
    let a = Instance::http(&cp, "api-a", "a-1").await;
    let b = Instance::http(&cp, "api-b", "b-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(a.endpoint(), true).await;
    web.wait_endpoint(b.endpoint(), true).await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "a-1").await;

    let files = async || -> Vec<String> {
        cp.policies().await["files"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|f| f["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The hidden `..data` and timestamped directory are not policies.
    assert_eq!(files().await, ["00-services.yaml", "10-routes.yaml"]);
    let reloads = async || {
        cp.metrics()
            .await
            .get("weft_control_policy_reloads_total", &[("result", "ok")])
            .unwrap_or(0.0)
    };

    let updates: [Update; 3] = [
        (
            "a changed key",
            payload(&[
                ("00-services.yaml", SERVICES.to_owned()),
                ("10-routes.yaml", route_to("api-b")),
            ]),
            "b-1",
            &["00-services.yaml", "10-routes.yaml"],
        ),
        (
            "a key added and one removed",
            payload(&[
                ("00-services.yaml", SERVICES.to_owned()),
                ("20-canary.yaml", route_to("api-a")),
            ]),
            "a-1",
            &["00-services.yaml", "20-canary.yaml"],
        ),
        (
            // The route's file and the services it names change together: read apart, the
            // route would point at a service that does not exist yet and be refused.
            "keys that depend on each other",
            payload(&[
                ("00-services.yaml", format!("{SERVICES}  - name: api-c\n")),
                ("20-canary.yaml", route_to("api-c")),
            ]),
            "",
            &["00-services.yaml", "20-canary.yaml"],
        ),
    ];
    for (what, files_now, instance, names) in updates {
        let before = reloads().await;
        let version_before = cp.policies().await["version"].clone();
        writer.write(&files_now).unwrap();
        wait_until(
            DEFAULT_WAIT,
            &format!("{what}: a new policy version"),
            async || {
                let p = cp.policies().await;
                if p["version"] != version_before {
                    Ok(())
                } else {
                    Err(p.to_string())
                }
            },
        )
        .await;
        let p = cp.policies().await;
        assert!(p["error"].is_null(), "{what}: {p}");
        assert_eq!(files().await, names, "{what}");
        if !instance.is_empty() {
            wait_for_instance(&client, "api", "/", instance).await;
            let t = tally(&client, "api", "/", 20).await;
            assert_eq!(t.count(instance), 20, "{what}: {t:?}");
        }
        // Quiet for a while: the update was one reload, not one per step of the writer.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            reloads().await,
            before + 1.0,
            "{what}: reloads of one update"
        );
    }

    // The admin API does not write into a ConfigMap volume.
    let r = cp
        .admin_request(
            http::Method::PUT,
            "/v1/policies/x.yaml",
            "services: [{name: x}]\n",
        )
        .await;
    assert!(
        r.status.as_u16() >= 400 && r.text().contains("ConfigMap"),
        "{}",
        r.summary()
    );
    assert!(!volume.path().join("x.yaml").exists());

    // A broken update: the last good set keeps serving, the error is reported, traffic stays.
    let api_c = Instance::http(&cp, "api-c", "c-1").await;
    web.wait_endpoint(api_c.endpoint(), true).await;
    wait_for_instance(&client, "api", "/", "c-1").await;
    writer
        .write(&payload(&[
            ("00-services.yaml", "services: [\n".to_owned()),
            ("20-canary.yaml", route_to("api-c")),
        ]))
        .unwrap();
    wait_until(DEFAULT_WAIT, "the broken update is reported", async || {
        let p = cp.policies().await;
        if p["error"]
            .as_str()
            .is_some_and(|e| e.contains("00-services.yaml"))
        {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    let t = tally(&client, "api", "/", 10).await;
    assert_eq!(t.count("c-1"), 10, "the last good set keeps serving: {t:?}");
}
