//! The injection webhook's pure parts: pods in, patched pods out (patches applied with
//! json-patch), and AdmissionReviews answered.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use super::config::InjectConfig;
use super::pod::{inject, Injector, Outcome};
use super::review::{answer, FailurePolicy, Malformed};

const CONFIG: &str = r#"
proxy:
  image: "weft/weft-proxy:0.1.0"
  uid: 1337
  resources: {requests: {cpu: 50m, memory: 32Mi}, limits: {memory: 128Mi}}
controlPlane: {address: "https://weft-control.weft-system.svc:15010"}
capture: {excludeOutboundCIDRs: [169.254.169.254/32]}
"#;

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn config() -> InjectConfig {
    InjectConfig::parse(CONFIG, "inject.yaml").unwrap()
}

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn one_container() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "labels": {"app": "web", "version": "v1", "pod-template-hash": "abc"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]
        }
    })
}

/// Injects `pod` (namespace `shop` from the review) and returns the patched pod as JSON.
fn injected(config: &InjectConfig, original: Value) -> (Value, Vec<String>) {
    let injector = Injector {
        config,
        control_plane_ca: CA,
        version: "0.1.0",
    };
    match inject(&pod(original.clone()), "shop", &injector) {
        Outcome::Inject { patch, warnings } => {
            let mut doc = original;
            json_patch::patch(&mut doc, &patch).unwrap();
            (doc, warnings)
        }
        other => panic!("not injected: {other:?}"),
    }
}

fn outcome(original: Value) -> Outcome {
    let config = config();
    inject(
        &pod(original),
        "shop",
        &Injector {
            config: &config,
            control_plane_ca: CA,
            version: "0.1.0",
        },
    )
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn bootstrap(proxy: &Value) -> serde_yaml::Value {
    serde_yaml::from_str(
        env(proxy, "WEFT_BOOTSTRAP").unwrap()["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn a_pod_gets_the_capture_init_container_then_the_native_sidecar() {
    let (pod, warnings) = injected(&config(), one_container());
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(pod["metadata"]["annotations"]["weft.io/injected"], "0.1.0");
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    let (init, proxy) = (&inits[0], &inits[1]);

    assert_eq!(init["name"], "weft-init");
    assert_eq!(init["command"], json!(["weft-proxy"]));
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &args[..5],
        ["init", "--proxy-uid", "1337", "--proxy-gid", "1337"]
    );
    assert!(
        args.windows(2).any(|w| w == ["--admin-port", "15000"]),
        "{args:?}"
    );
    // The status port (the kubelet's probes, Prometheus) is never captured.
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--exclude-inbound-ports" && w[1].split(',').any(|p| p == "15020")),
        "{args:?}"
    );
    assert!(
        args.windows(2).any(|w| w == ["--inbound-port", "15006"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--exclude-outbound-cidrs", "169.254.169.254/32"]),
        "{args:?}"
    );
    let sc = &init["securityContext"];
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);

    assert_eq!(proxy["name"], "weft-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["image"], "weft/weft-proxy:0.1.0");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15020);
    assert_eq!(
        proxy["ports"],
        json!([{"name": "weft-status", "containerPort": 15020, "protocol": "TCP"}])
    );
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsGroup"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}})
    );
    assert_eq!(
        env(proxy, "POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(env(proxy, "WEFT_CONTROL_PLANE_CA").unwrap()["value"], CA);
    assert_eq!(env(proxy, "RUST_LOG").unwrap()["value"], "info");

    let b = bootstrap(proxy);
    assert_eq!(b["node"]["service"], "web");
    // The pod has no namespace yet: the review's.
    assert_eq!(b["node"]["namespace"], "shop");
    assert_eq!(b["node"]["id"], "${POD_NAME}.${POD_NAMESPACE}");
    assert_eq!(b["node"]["labels"]["version"], "v1");
    assert!(b["node"]["labels"].get("pod-template-hash").is_none());
    assert_eq!(
        b["control_plane"],
        "https://weft-control.weft-system.svc:15010"
    );
    assert_eq!(b["join_token_file"], "/var/run/secrets/weft.io/token/token");
    assert_eq!(b["transparent"]["instance_ip"], "${POD_IP}");
    assert_eq!(
        b["transparent"]["app_ports"],
        serde_yaml::to_value([8080]).unwrap()
    );
    assert_eq!(b["inbound"]["address"], "${POD_IP}:15006");
    // /config_dump and /log_level stay on the pod's loopback; the status port is read-only.
    assert_eq!(b["admin"], "127.0.0.1:15000");
    assert_eq!(b["status"], "0.0.0.0:15020");

    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "weft-token").unwrap();
    let projection = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projection["audience"], "weft");
    assert_eq!(projection["expirationSeconds"], 3600);
    // The app container is untouched.
    assert_eq!(
        pod["spec"]["containers"],
        one_container()["spec"]["containers"]
    );
}

#[test]
fn existing_init_containers_volumes_and_annotations_are_kept_after_ours() {
    let original = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "db-0", "namespace": "data", "annotations": {"a": "b"}},
        "spec": {
            "initContainers": [{"name": "migrate", "image": "m:1"}],
            "containers": [
                {"name": "db", "image": "db:1", "ports": [{"containerPort": 5432, "name": "pg"}]},
                {"name": "exporter", "image": "e:1", "ports": [{"containerPort": 9187}, {"containerPort": 53, "protocol": "UDP"}, {"containerPort": 15001}]}
            ],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }
    });
    let (pod, warnings) = injected(&config(), original);
    let names: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["weft-init", "weft-proxy", "migrate"]);
    let volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, ["data", "weft-token", "weft-run"]);
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({"a": "b", "weft.io/injected": "0.1.0"})
    );
    let b = bootstrap(&pod["spec"]["initContainers"][1]);
    // ServiceAccount "default"; the pod's own namespace wins over the review's.
    assert_eq!(
        (
            b["node"]["service"].as_str(),
            b["node"]["namespace"].as_str()
        ),
        (Some("default"), Some("data"))
    );
    // TCP ports of every container, the proxy's own port left out (with a warning).
    assert_eq!(
        b["transparent"]["app_ports"],
        serde_yaml::to_value([5432, 9187]).unwrap()
    );
    assert!(warnings.iter().any(|w| w.contains("15001")), "{warnings:?}");
}

#[test]
fn probes_are_rewritten_to_the_proxy_and_carried_in_its_env() {
    let original = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"serviceAccountName": "api", "containers": [{
            "name": "api", "image": "api:1",
            "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 3},
            "readinessProbe": {"tcpSocket": {"port": 8080}},
            "startupProbe": {"grpc": {"port": 9090}}
        }]}
    });
    let (pod, _) = injected(&config(), original);
    let app = &pod["spec"]["containers"][0];
    for (field, path) in [
        ("livenessProbe", "/app-health/api/livez"),
        ("readinessProbe", "/app-health/api/readyz"),
        ("startupProbe", "/app-health/api/startupz"),
    ] {
        assert_eq!(
            app[field]["httpGet"],
            json!({"path": path, "port": 15020, "scheme": "HTTP"}),
            "{field}"
        );
    }
    assert_eq!(app["livenessProbe"]["periodSeconds"], 3);
    let probes: Value = serde_json::from_str(
        env(&pod["spec"]["initContainers"][1], "WEFT_APP_PROBES").unwrap()["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(probes["/app-health/api/livez"]["http"]["port"], 8080);
    assert_eq!(probes["/app-health/api/livez"]["http"]["path"], "/healthz");
    assert_eq!(probes["/app-health/api/readyz"]["tcp"]["port"], 8080);
    assert_eq!(probes["/app-health/api/startupz"]["grpc"]["port"], 9090);
}

#[test]
fn opted_out_already_injected_and_host_network_pods_are_left_alone() {
    let mut opted_out = one_container();
    opted_out["metadata"]["annotations"] = json!({"weft.io/inject": "false"});
    assert!(
        matches!(outcome(opted_out), Outcome::Skip { reason, warning: false } if reason.contains("opted out"))
    );

    let mut host = one_container();
    host["spec"]["hostNetwork"] = json!(true);
    assert!(
        matches!(outcome(host), Outcome::Skip { reason, warning: true } if reason.contains("hostNetwork"))
    );

    // Idempotent: the injected pod (marker and containers) is left alone, and so is one with
    // only our container (the marker removed by hand).
    let (mut pod, _) = injected(&config(), one_container());
    assert!(
        matches!(outcome(pod.clone()), Outcome::Skip { reason, .. } if reason == "already injected")
    );
    pod["metadata"]["annotations"] = json!({});
    assert!(matches!(outcome(pod), Outcome::Skip { reason, .. } if reason == "already injected"));
}

#[test]
fn annotations_override_resources_log_level_and_exclusions() {
    let mut original = one_container();
    original["metadata"]["annotations"] = json!({
        "weft.io/proxy-cpu-request": "100m", "weft.io/proxy-cpu-limit": "1",
        "weft.io/proxy-memory-request": "64Mi", "weft.io/proxy-memory-limit": "256Mi",
        "weft.io/log-level": "debug",
        "weft.io/exclude-inbound-ports": "8080, 22",
        "weft.io/exclude-outbound-ports": "5432",
        "weft.io/exclude-outbound-cidrs": "10.0.0.0/8"
    });
    let (pod, _) = injected(&config(), original);
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}})
    );
    assert_eq!(env(proxy, "RUST_LOG").unwrap()["value"], "debug");
    let args: Vec<&str> = pod["spec"]["initContainers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--exclude-inbound-ports", "15020,22,8080"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--exclude-outbound-ports", "5432"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--exclude-outbound-cidrs", "169.254.169.254/32,10.0.0.0/8"]),
        "{args:?}"
    );
    // An excluded inbound port is not announced: callers' sidecars would send it mTLS.
    assert_eq!(
        bootstrap(proxy)["transparent"]["app_ports"],
        serde_yaml::to_value(Vec::<u16>::new()).unwrap()
    );

    for (annotation, value) in [
        ("weft.io/proxy-cpu-request", "lots"),
        ("weft.io/exclude-inbound-ports", "80,http"),
        ("weft.io/exclude-outbound-cidrs", "10.0.0.0/40"),
        ("weft.io/log-level", "info,,=["),
    ] {
        let mut bad = one_container();
        bad["metadata"]["annotations"] = json!({ annotation: value });
        assert!(
            matches!(outcome(bad), Outcome::Refuse(reason) if reason.contains(annotation)),
            "{annotation}"
        );
    }
}

#[test]
fn the_service_is_the_service_account_and_a_label_must_agree_with_it() {
    let mut config = config();
    config.identity.service_from = super::config::ServiceFrom::Label;
    config.identity.service_label = "app".into();
    // app=web and ServiceAccount web: agreed.
    let (pod, _) = injected(&config, one_container());
    assert_eq!(
        bootstrap(&pod["spec"]["initContainers"][1])["node"]["service"],
        "web"
    );
    // A label naming another service than the ServiceAccount: the token could never certify it.
    let mut other = one_container();
    other["metadata"]["labels"]["app"] = json!("payments");
    let injector = Injector {
        config: &config,
        control_plane_ca: CA,
        version: "0.1.0",
    };
    assert!(
        matches!(inject(&pod_of(other), "shop", &injector), Outcome::Refuse(r) if r.contains("ServiceAccount"))
    );
    // A ServiceAccount name that is not a service name.
    let mut dotted = one_container();
    dotted["spec"]["serviceAccountName"] = json!("web.v2");
    assert!(matches!(outcome(dotted), Outcome::Refuse(r) if r.contains("not a DNS label")));
}

fn pod_of(v: Value) -> Pod {
    pod(v)
}

fn review(object: &Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE", "object": object
        }
    })
    .to_string()
    .into_bytes()
}

#[test]
fn reviews_are_answered_with_the_uid_and_a_base64_json_patch() {
    let config = config();
    let injector = Injector {
        config: &config,
        control_plane_ca: CA,
        version: "0.1.0",
    };
    let a = answer(&review(&one_container()), &injector, FailurePolicy::Open).unwrap();
    assert_eq!(a.result, "injected");
    let response = &a.body["response"];
    assert_eq!(a.body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut doc = one_container();
    json_patch::patch(&mut doc, &patch).unwrap();
    // Re-posting the patched pod: no patch.
    let again = answer(&review(&doc), &injector, FailurePolicy::Open).unwrap();
    assert_eq!(again.result, "skipped");
    assert!(again.body["response"].get("patch").is_none());
    assert_eq!(again.body["response"]["allowed"], true);

    let mut host = one_container();
    host["spec"]["hostNetwork"] = json!(true);
    let a = answer(&review(&host), &injector, FailurePolicy::Open).unwrap();
    assert!(a.body["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("hostNetwork"));

    let mut bad = one_container();
    bad["metadata"]["annotations"] = json!({"weft.io/proxy-memory-limit": "big"});
    let a = answer(&review(&bad), &injector, FailurePolicy::Open).unwrap();
    assert_eq!(
        (a.result, &a.body["response"]["allowed"]),
        ("refused", &json!(false))
    );
    assert_eq!(a.body["response"]["status"]["code"], 400);
}

#[test]
fn malformed_reviews_and_the_webhooks_own_failures() {
    let config = config();
    let injector = Injector {
        config: &config,
        control_plane_ca: CA,
        version: "0.1.0",
    };
    for (body, needle) in [
        (b"not json".to_vec(), "expected"),
        (br#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}}"#.to_vec(), "v1beta1"),
        (br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#.to_vec(), "no request"),
        (br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}}"#.to_vec(), "uid"),
    ] {
        let Malformed(e) = answer(&body, &injector, FailurePolicy::Open).unwrap_err();
        assert!(e.contains(needle), "{needle} not in {e}");
    }
    // Not a pod creation: admitted as is.
    let mut update: Value = serde_json::from_slice(&review(&one_container())).unwrap();
    update["request"]["operation"] = json!("UPDATE");
    let a = answer(
        update.to_string().as_bytes(),
        &injector,
        FailurePolicy::Closed,
    )
    .unwrap();
    assert_eq!(
        (a.result, &a.body["response"]["allowed"]),
        ("skipped", &json!(true))
    );
    // An object that is not a Pod: the webhook's own failure, by policy.
    let broken = review(&json!({"spec": {"containers": "nope"}}));
    let open = answer(&broken, &injector, FailurePolicy::Open).unwrap();
    assert_eq!(
        (open.result, &open.body["response"]["allowed"]),
        ("error", &json!(true))
    );
    assert!(open.body["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("without it"));
    let closed = answer(&broken, &injector, FailurePolicy::Closed).unwrap();
    assert_eq!(
        (closed.result, &closed.body["response"]["allowed"]),
        ("error", &json!(false))
    );
    assert_eq!(closed.body["response"]["status"]["code"], 500);
}
