//! The sidecar injection webhook, end to end: the real `weft-control` with `--inject-*` flags,
//! real AdmissionReview JSON posted over HTTPS with curl, the returned JSON Patch applied with
//! Python's `jsonpatch` (not our code), and the patched pods validated with
//! `kubernetes-validate --strict` against two Kubernetes versions. No API server can run here
//! (README "Kubernetes"): this is what can be checked offline.
//!
//! The Python tools live in the virtual environment `scripts/install-test-deps.sh` makes
//! (`$WEFT_INJECT_PYTHON`, default `target/inject-python`); this test runs that script first
//! (it does nothing when everything is installed).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use weft_testkit::{
    free_addr, wait_until, ControlPlane, ControlPlaneConfig, PolicyDir, DEFAULT_WAIT,
};

/// Kubernetes versions the patched pods are validated against: the oldest with native
/// sidecars on by default, and a recent one.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.33.0"];

const INJECT_YAML: &str = r#"
proxy:
  image: "weft/weft-proxy:0.1.0"
  imagePullPolicy: IfNotPresent
  uid: 1337
  logLevel: info
  resources: {requests: {cpu: 50m, memory: 32Mi}, limits: {memory: 128Mi}}
controlPlane:
  address: "https://weft-control.weft-system.svc:15010"
identity:
  serviceFrom: serviceAccount
  tokenAudience: weft
capture:
  excludeOutboundCIDRs: [169.254.169.254/32]
"#;

/// Applies the webhook's answer to the pod with Python's jsonpatch (argv: pod, answer, out).
const APPLY_PATCH: &str = r#"
import base64, json, sys
import jsonpatch
pod = json.load(open(sys.argv[1]))
answer = json.load(open(sys.argv[2]))
r = answer["response"]
if "patch" in r:
    assert r["patchType"] == "JSONPatch", r
    ops = json.loads(base64.b64decode(r["patch"]))
    pod = jsonpatch.JsonPatch(ops).apply(pod)
json.dump(pod, open(sys.argv[3], "w"), indent=1)
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The venv with jsonpatch and kubernetes-validate, installed if missing.
fn inject_python() -> PathBuf {
    let root = repo_root();
    let venv = std::env::var_os("WEFT_INJECT_PYTHON")
        .map_or_else(|| root.join("target/inject-python"), PathBuf::from);
    let out = Command::new(root.join("scripts/install-test-deps.sh"))
        .env("WEFT_INJECT_PYTHON", &venv)
        .output()
        .expect("running scripts/install-test-deps.sh");
    assert!(
        out.status.success(),
        "scripts/install-test-deps.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    venv
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A self-signed serving certificate for `ip` (what the chart's Secret holds), written to
/// `dir/<name>.crt|key`.
fn serving_cert(dir: &Path, name: &str, ip: &str, days: u32) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .args(["-days", &days.to_string(), "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=IP:{ip}")]));
    (crt, key)
}

/// The webhook under test.
struct Webhook {
    cp: ControlPlane,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Webhook {
    async fn start(policies: &PolicyDir) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let ip = weft_testkit::next_loopback_ip();
        let addr = free_addr(ip);
        let (crt, key) = serving_cert(dir.path(), "webhook", &ip.to_string(), 365);
        let config = dir.path().join("inject.yaml");
        std::fs::write(&config, INJECT_YAML).unwrap();
        let mut cp_config = ControlPlaneConfig::new(policies.path());
        cp_config.extra_args = vec![
            "--inject-addr".into(),
            addr.to_string(),
            "--inject-tls-cert".into(),
            crt.display().to_string(),
            "--inject-tls-key".into(),
            key.display().to_string(),
            "--inject-config".into(),
            config.display().to_string(),
        ];
        let cp = ControlPlane::start_with(cp_config).await;
        let webhook = Webhook {
            cp,
            addr,
            ca: crt,
            dir,
        };
        wait_until(
            DEFAULT_WAIT,
            "the webhook's GET /healthz answers 200",
            async || {
                let code = webhook.curl(&[
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &webhook.url("/healthz"),
                ]);
                if code == "200" {
                    Ok(())
                } else {
                    Err(format!("GET /healthz: {code:?}"))
                }
            },
        )
        .await;
        webhook
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// curl against the webhook, verifying it with `self.ca`; returns stdout.
    fn curl(&self, args: &[&str]) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&self.ca)
            .args(args)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Posts `body` to /inject: (HTTP status, answer).
    fn post(&self, body: &str) -> (u16, Value) {
        let file = self.dir.path().join("review.json");
        std::fs::write(&file, body).unwrap();
        let out = self.curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
            "-w",
            "\n%{http_code}",
            &self.url("/inject"),
        ]);
        let (body, status) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        let status: u16 = status
            .parse()
            .unwrap_or_else(|_| panic!("curl printed {out:?}"));
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

fn review(uid: &str, pod: &Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
    .to_string()
}

/// The pod shapes of the issue.
fn pods() -> Vec<(&'static str, Value)> {
    vec![
        (
            "one-container",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "web-7d9f8-", "labels": {"app": "web", "pod-template-hash": "7d9f8"}},
                "spec": {"serviceAccountName": "web", "containers": [
                    {"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}
                ]}
            }),
        ),
        (
            "several-containers-named-ports-probes",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "api-0", "namespace": "shop", "labels": {"app": "api", "version": "v2"}},
                "spec": {"serviceAccountName": "api", "containers": [
                    {"name": "api", "image": "api:2",
                     "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                     "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http", "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "periodSeconds": 5},
                     "readinessProbe": {"tcpSocket": {"port": "http"}, "initialDelaySeconds": 2},
                     "startupProbe": {"grpc": {"port": 9090, "service": "api"}, "failureThreshold": 30}},
                    {"name": "metrics", "image": "exporter:1",
                     "ports": [{"name": "metrics", "containerPort": 9100}, {"containerPort": 5353, "protocol": "UDP"}],
                     "readinessProbe": {"exec": {"command": ["true"]}}}
                ]}
            }),
        ),
        (
            "existing-init-containers",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "db-0", "annotations": {"team": "data", "weft.io/proxy-memory-limit": "256Mi", "weft.io/exclude-outbound-ports": "5432"}},
                "spec": {
                    "serviceAccountName": "db",
                    "initContainers": [
                        {"name": "migrate", "image": "migrate:1", "command": ["migrate", "up"]},
                        {"name": "log-shipper", "image": "shipper:1", "restartPolicy": "Always", "ports": [{"containerPort": 24224}]}
                    ],
                    "containers": [{"name": "db", "image": "postgres:17", "ports": [{"containerPort": 5432}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}]
                }
            }),
        ),
    ]
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

fn env<'a>(container: &'a Value, name: &str) -> &'a str {
    container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .and_then(|v| v["value"].as_str())
        .unwrap_or_else(|| panic!("no env {name} in {container}"))
}

/// Every container of `pod` (init and app) that adds a capability, by name.
fn capabilities_added(pod: &Value) -> Vec<(String, Value)> {
    let spec = &pod["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
        .filter(|c| !c["securityContext"]["capabilities"]["add"].is_null())
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["securityContext"]["capabilities"]["add"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reviews_for_every_pod_shape_patch_into_valid_pods() {
    let python = inject_python();
    let policies = PolicyDir::new();
    let webhook = Webhook::start(&policies).await;
    let work = webhook.dir.path();

    for (i, (shape, pod)) in pods().into_iter().enumerate() {
        let uid = format!("0b7e6a1c-0000-4000-8000-00000000000{i}");
        let (status, answer) = webhook.post(&review(&uid, &pod));
        assert_eq!(status, 200, "{shape}: {answer}");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{shape}");
        assert_eq!(answer["kind"], "AdmissionReview", "{shape}");
        let response = &answer["response"];
        assert_eq!(response["uid"], uid.as_str(), "{shape}: the uid is echoed");
        assert_eq!(response["allowed"], true, "{shape}: {answer}");
        assert_eq!(response["patchType"], "JSONPatch", "{shape}: {answer}");

        // The patch, applied by Python's jsonpatch.
        let (pod_file, answer_file, patched_file) = (
            work.join(format!("{shape}.pod.json")),
            work.join(format!("{shape}.answer.json")),
            work.join(format!("{shape}.patched.json")),
        );
        std::fs::write(&pod_file, pod.to_string()).unwrap();
        std::fs::write(&answer_file, answer.to_string()).unwrap();
        run(Command::new(python.join("bin/python3"))
            .arg("-c")
            .arg(APPLY_PATCH)
            .args([&pod_file, &answer_file, &patched_file]));
        let patched: Value =
            serde_json::from_str(&std::fs::read_to_string(&patched_file).unwrap()).unwrap();

        // The patched pod is a valid Pod for both Kubernetes versions, unknown fields refused.
        // (The API server names a generateName pod after the webhooks ran, as done here.)
        let mut named = patched.clone();
        if named["metadata"]["name"].is_null() {
            named["metadata"]["name"] = json!(format!(
                "{}x7k2p",
                named["metadata"]["generateName"].as_str().unwrap_or("pod-")
            ));
        }
        let validated_file = work.join(format!("{shape}.validated.json"));
        std::fs::write(&validated_file, named.to_string()).unwrap();
        for version in KUBERNETES_VERSIONS {
            let out = Command::new(python.join("bin/kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", version])
                .arg(&validated_file)
                .output()
                .expect("kubernetes-validate");
            assert!(
                out.status.success(),
                "{shape}: the patched pod is not a valid Kubernetes {version} Pod:\n{}{}\n{patched:#}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // Its content: the capture init container first, then the native sidecar, then the
        // pod's own init containers; NET_ADMIN only on the capture container.
        let inits = &patched["spec"]["initContainers"];
        let init_names = names(inits);
        assert_eq!(&init_names[..2], ["weft-init", "weft-proxy"], "{shape}");
        assert_eq!(
            &init_names[2..],
            names(&pod["spec"]["initContainers"]).as_slice(),
            "{shape}"
        );
        let (capture, proxy) = (&inits[0], &inits[1]);
        assert_eq!(capture["args"][0], "init", "{shape}");
        assert_eq!(
            capabilities_added(&patched),
            [("weft-init".to_owned(), json!(["NET_ADMIN"]))],
            "{shape}: capabilities are added to the capture container only"
        );
        assert_eq!(capture["securityContext"]["privileged"], false, "{shape}");
        assert_eq!(
            proxy["restartPolicy"], "Always",
            "{shape}: a native sidecar"
        );
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337, "{shape}");
        assert_eq!(proxy["securityContext"]["runAsNonRoot"], true, "{shape}");
        assert_eq!(
            proxy["securityContext"]["readOnlyRootFilesystem"], true,
            "{shape}"
        );
        assert_eq!(
            proxy["securityContext"]["capabilities"]["drop"],
            json!(["ALL"]),
            "{shape}"
        );
        assert_eq!(
            proxy["startupProbe"]["httpGet"]["path"], "/ready",
            "{shape}"
        );
        assert_eq!(
            patched["metadata"]["annotations"]["weft.io/injected"],
            env!("CARGO_PKG_VERSION"),
            "{shape}"
        );
        let ca = env(proxy, "WEFT_CONTROL_PLANE_CA");
        assert_eq!(
            ca,
            std::fs::read_to_string(webhook.cp.roots_pem()).unwrap(),
            "{shape}: the control plane's CA roots are inlined"
        );
        let bootstrap: Value = serde_yaml::from_str(env(proxy, "WEFT_BOOTSTRAP")).unwrap();
        let token = patched["spec"]["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "weft-token"))
            .unwrap_or_else(|| panic!("{shape}: no token volume"));
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "weft",
            "{shape}"
        );

        match shape {
            "one-container" => {
                assert_eq!(bootstrap["node"]["service"], "web");
                // The pod has no namespace yet (a ReplicaSet's pod): the review's.
                assert_eq!(bootstrap["node"]["namespace"], "shop");
                assert_eq!(bootstrap["transparent"]["app_ports"], json!([8080]));
                assert_eq!(
                    patched["spec"]["containers"], pod["spec"]["containers"],
                    "the app is untouched"
                );
            }
            "several-containers-named-ports-probes" => {
                assert_eq!(bootstrap["node"]["service"], "api");
                // TCP ports of both containers, named ones resolved; the UDP one left out.
                assert_eq!(
                    bootstrap["transparent"]["app_ports"],
                    json!([8080, 9090, 9100])
                );
                let api = &patched["spec"]["containers"][0];
                for (probe, path) in [
                    ("livenessProbe", "/app-health/api/livez"),
                    ("readinessProbe", "/app-health/api/readyz"),
                    ("startupProbe", "/app-health/api/startupz"),
                ] {
                    assert_eq!(api[probe]["httpGet"]["port"], 15020, "{probe}");
                    assert_eq!(api[probe]["httpGet"]["path"], path, "{probe}");
                    assert!(
                        api[probe]["tcpSocket"].is_null() && api[probe]["grpc"].is_null(),
                        "{probe}"
                    );
                }
                assert_eq!(api["livenessProbe"]["periodSeconds"], 5);
                assert_eq!(api["startupProbe"]["failureThreshold"], 30);
                // The exec probe stays.
                assert_eq!(
                    patched["spec"]["containers"][1]["readinessProbe"],
                    json!({"exec": {"command": ["true"]}})
                );
                let probes: Value = serde_json::from_str(env(proxy, "WEFT_APP_PROBES")).unwrap();
                assert_eq!(probes["/app-health/api/livez"]["http"]["port"], 8080);
                assert_eq!(
                    probes["/app-health/api/livez"]["http"]["headers"],
                    json!([["X-Probe", "1"]])
                );
                assert_eq!(probes["/app-health/api/readyz"]["tcp"]["port"], 8080);
                assert_eq!(
                    probes["/app-health/api/startupz"]["grpc"],
                    json!({"port": 9090, "service": "api", "timeout_seconds": 1})
                );
            }
            "existing-init-containers" => {
                assert_eq!(bootstrap["node"]["service"], "db");
                // The pod's own native sidecar's port is announced too.
                assert_eq!(bootstrap["transparent"]["app_ports"], json!([5432, 24224]));
                assert_eq!(proxy["resources"]["limits"]["memory"], "256Mi");
                let args: Vec<&str> = capture["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                assert!(
                    args.windows(2)
                        .any(|w| w == ["--exclude-outbound-ports", "5432"]),
                    "{args:?}"
                );
                assert_eq!(
                    names(&patched["spec"]["volumes"]),
                    ["data", "weft-token", "weft-run"]
                );
                assert_eq!(patched["metadata"]["annotations"]["team"], "data");
            }
            other => unreachable!("{other}"),
        }

        // Idempotent: the patched pod, posted again, gets no patch.
        let (status, again) = webhook.post(&review("again", &patched));
        assert_eq!(status, 200);
        assert_eq!(again["response"]["allowed"], true, "{shape}: {again}");
        assert!(
            again["response"].get("patch").is_none(),
            "{shape}: re-posting the injected pod patched it again: {again}"
        );
        assert!(
            again["response"]["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("already injected"),
            "{shape}: {again}"
        );
    }

    // Opted out, and hostNetwork: allowed, no patch; hostNetwork says why in a warning.
    let (_, web) = &pods()[0];
    let mut opted_out = web.clone();
    opted_out["metadata"]["annotations"] = json!({"weft.io/inject": "false"});
    let (status, answer) = webhook.post(&review("opted-out", &opted_out));
    assert_eq!(
        (status, &answer["response"]["allowed"]),
        (200, &json!(true)),
        "{answer}"
    );
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("opted out"),
        "{answer}"
    );
    let mut host = web.clone();
    host["spec"]["hostNetwork"] = json!(true);
    let (status, answer) = webhook.post(&review("host-network", &host));
    assert_eq!(
        (status, &answer["response"]["allowed"]),
        (200, &json!(true)),
        "{answer}"
    );
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("hostNetwork"),
        "{answer}"
    );

    // A pod whose annotation cannot make a sidecar is refused, naming it.
    let mut bad = web.clone();
    bad["metadata"]["annotations"] = json!({"weft.io/proxy-cpu-limit": "lots"});
    let (status, answer) = webhook.post(&review("bad", &bad));
    assert_eq!(
        (status, &answer["response"]["allowed"]),
        (200, &json!(false)),
        "{answer}"
    );
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("weft.io/proxy-cpu-limit"),
        "{answer}"
    );

    // Not an AdmissionReview: a clear 400; other paths and methods are refused.
    let (status, answer) = webhook.post("{\"apiVersion\": \"admission.k8s.io/v1beta1\", \"kind\": \"AdmissionReview\", \"request\": {\"uid\": \"x\"}}");
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("v1beta1"),
        "{answer}"
    );
    let (status, _) = webhook.post("not json");
    assert_eq!(status, 400);
    assert_eq!(
        webhook.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &webhook.url("/inject")
        ]),
        "405"
    );
    assert_eq!(
        webhook.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &webhook.url("/other")
        ]),
        "404"
    );
    // A body over the limit: 413, the webhook still serves.
    let big = work.join("big.json");
    std::fs::write(&big, vec![b' '; 9 << 20]).unwrap();
    let code = webhook.curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", big.display()),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &webhook.url("/inject"),
    ]);
    assert!(code == "413" || code == "000", "an oversized body: {code}");

    // Every answer counted by result.
    let metrics = webhook.cp.metrics().await;
    let count = |result: &str| {
        metrics
            .get("weft_inject_requests_total", &[("result", result)])
            .unwrap_or(-1.0)
    };
    assert_eq!(
        count("injected"),
        3.0,
        "{}",
        metrics.lines_for("weft_inject_requests_total")
    );
    assert_eq!(
        count("skipped"),
        5.0,
        "{}",
        metrics.lines_for("weft_inject_requests_total")
    );
    assert_eq!(count("refused"), 1.0);
    assert!(
        count("malformed") >= 2.0,
        "{}",
        metrics.lines_for("weft_inject_requests_total")
    );
    assert_eq!(count("error"), 0.0);
}

fn inject_python_bin() -> PathBuf {
    std::env::var_os("WEFT_INJECT_PYTHON")
        .map_or_else(|| repo_root().join("target/inject-python"), PathBuf::from)
        .join("bin/python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_and_the_serving_certificate_are_reread_when_they_change() {
    inject_python();
    let policies = PolicyDir::new();
    let webhook = Webhook::start(&policies).await;
    let (_, pod) = &pods()[0];
    let image = |answer: &Value| -> String {
        let patch = answer["response"]["patch"].as_str().unwrap_or_default();
        let out = run(Command::new(inject_python_bin()).arg("-c").arg(
            "import base64, json, sys; ops = json.loads(base64.b64decode(sys.argv[1])); \
             print([o for o in ops if o['path'] == '/spec/initContainers'][0]['value'][1]['image'])",
        ).arg(patch));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (_, answer) = webhook.post(&review("u1", pod));
    assert_eq!(image(&answer), "weft/weft-proxy:0.1.0");

    // The ConfigMap changes (written aside, renamed over, as a volume update swaps it).
    let config = webhook.dir.path().join("inject.yaml");
    let tmp = webhook.dir.path().join("inject.yaml.tmp");
    std::fs::write(&tmp, INJECT_YAML.replace("0.1.0", "0.2.0")).unwrap();
    std::fs::rename(&tmp, &config).unwrap();
    let (_, answer) = webhook.post(&review("u2", pod));
    assert_eq!(image(&answer), "weft/weft-proxy:0.2.0");
    // A broken one keeps the last good config.
    std::fs::write(
        &tmp,
        "proxy: {image: x, imag: typo}\ncontrolPlane: {address: 'https://cp:1'}\n",
    )
    .unwrap();
    std::fs::rename(&tmp, &config).unwrap();
    let (status, answer) = webhook.post(&review("u3", pod));
    assert_eq!(status, 200);
    assert_eq!(image(&answer), "weft/weft-proxy:0.2.0");
    assert!(
        webhook.cp.process.log().contains("imag"),
        "the broken config is logged, naming the field"
    );

    // The Secret is rotated: the next connection is served with the new certificate, which
    // the old CA file no longer verifies.
    let ip = webhook.addr.ip().to_string();
    let old = webhook.dir.path().join("webhook-old.crt");
    std::fs::copy(&webhook.ca, &old).unwrap();
    let (new_crt, new_key) = serving_cert(webhook.dir.path(), "rotated", &ip, 365);
    let (crt, key) = (
        webhook.dir.path().join("webhook.crt"),
        webhook.dir.path().join("webhook.key"),
    );
    std::fs::copy(&new_key, key.with_extension("key.tmp")).unwrap();
    std::fs::copy(&new_crt, crt.with_extension("crt.tmp")).unwrap();
    std::fs::rename(key.with_extension("key.tmp"), &key).unwrap();
    std::fs::rename(crt.with_extension("crt.tmp"), &crt).unwrap();
    let healthz = |ca: &Path| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(ca)
            .arg(webhook.url("/healthz"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        healthz(&new_crt),
        "200",
        "the rotated certificate is served"
    );
    assert_ne!(
        healthz(&old),
        "200",
        "the old certificate is no longer served"
    );
}

/// Mints what the cluster's service-account issuer would (RS256 with openssl): `jwks KEY`
/// prints the JWKS of the key, `token KEY NAMESPACE ACCOUNT AUDIENCE` a projected token of
/// that ServiceAccount (pod `web-0`, one hour), with the claims the kubelet's TokenRequest sets.
const MINT: &str = r#"
import base64, json, subprocess, sys, time
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
key = sys.argv[2]
if sys.argv[1] == "jwks":
    mod = subprocess.run(["openssl", "rsa", "-in", key, "-noout", "-modulus"], check=True, capture_output=True, text=True).stdout
    n = bytes.fromhex(mod.strip().split("=", 1)[1])
    print(json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "k1", "n": b64(n), "e": "AQAB"}]}))
else:
    ns, sa, aud = sys.argv[3:6]
    now = int(time.time())
    claims = {"aud": [aud], "exp": now + 3600, "iat": now, "nbf": now,
              "iss": "https://kubernetes.default.svc.cluster.local",
              "sub": "system:serviceaccount:%s:%s" % (ns, sa),
              "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "2e3f4051"},
                                "pod": {"name": "web-0", "uid": "1d2e3f40"}, "node": {"name": "node-1", "uid": "0c5e"}}}
    head = b64(json.dumps({"alg": "RS256", "kid": "k1", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signing = (head + "." + body).encode()
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing, check=True, capture_output=True).stdout
    print(head + "." + body + "." + b64(sig))
"#;

fn mint(key: &Path, args: &[&str]) -> String {
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(MINT)
        .args(args[..1].iter())
        .arg(key)
        .args(&args[1..]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The patched pod's container `name` (init or app).
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["spec"]["containers"].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {pod}"))
}

/// The patch runs: in a network namespace (the pod), `weft-init`'s exact command installs the
/// capture rules, and `weft-proxy` starts with exactly the injected container's env (the
/// downward-API values filled in as the kubelet would), its bootstrap from `WEFT_BOOTSTRAP`,
/// the control plane's CA from `WEFT_CONTROL_PLANE_CA`, and the projected token as its join
/// credential, verified by the control plane against the issuer's JWKS: a token of another
/// ServiceAccount is refused, the right one (swapped in like the kubelet's rotation) gets the
/// certificate and the proxy becomes ready. The app's rewritten probes answer through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pod_joins_with_its_service_account_token_and_answers_its_probes() {
    let net = match weft_testkit::netns::Network::create(&["pod"]) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("\n*** SKIPPED injected-pod namespace test: cannot create network namespaces ({e}); it needs root ***\n");
            return;
        }
    };
    let python = inject_python();
    let dir = tempfile::tempdir().unwrap();
    let pod_ip = net.host_ip("pod");

    // The cluster's service-account issuer.
    let key = dir.path().join("sa.key");
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key));
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, mint(&key, &["jwks"])).unwrap();

    // The control plane, reachable from the pod's namespace, with the webhook and the
    // Kubernetes token path.
    let policies = PolicyDir::with_file("services.yaml", "services:\n  - name: web\n");
    let mut cp_config = ControlPlaneConfig::new(policies.path());
    let gateway = net.gateway_ip();
    cp_config.grpc = Some(SocketAddr::new(gateway, weft_testkit::free_port(gateway)));
    let webhook_ip = weft_testkit::next_loopback_ip();
    let webhook_addr = free_addr(webhook_ip);
    let (crt, tls_key) = serving_cert(dir.path(), "webhook", &webhook_ip.to_string(), 365);
    let inject = dir.path().join("inject.yaml");
    let cp_url = format!("https://{}", cp_config.grpc.unwrap());
    std::fs::write(
        &inject,
        INJECT_YAML.replace("https://weft-control.weft-system.svc:15010", &cp_url),
    )
    .unwrap();
    cp_config.extra_args = [
        "--inject-addr",
        &webhook_addr.to_string(),
        "--inject-tls-cert",
        &crt.display().to_string(),
        "--inject-tls-key",
        &tls_key.display().to_string(),
        "--inject-config",
        &inject.display().to_string(),
        "--k8s-jwks",
        &jwks.display().to_string(),
        "--k8s-issuer",
        "https://kubernetes.default.svc.cluster.local",
        "--k8s-audience",
        "weft",
    ]
    .map(str::to_owned)
    .to_vec();
    let cp = ControlPlane::start_with(cp_config).await;
    let webhook = Webhook {
        cp,
        addr: webhook_addr,
        dir,
        ca: crt,
    };
    wait_until(DEFAULT_WAIT, "the webhook answers", async || match webhook
        .curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &webhook.url("/healthz"),
        ])
        .as_str()
    {
        "200" => Ok(()),
        other => Err(other.to_owned()),
    })
    .await;

    // The pod, injected by the webhook.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{
            "name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
            "livenessProbe": {"tcpSocket": {"port": 8080}}
        }]}
    });
    let work = webhook.dir.path();
    let (status, answer) = webhook.post(&review("pod", &pod));
    assert_eq!(status, 200, "{answer}");
    std::fs::write(work.join("pod.json"), pod.to_string()).unwrap();
    std::fs::write(work.join("answer.json"), answer.to_string()).unwrap();
    run(Command::new(python.join("bin/python3"))
        .arg("-c")
        .arg(APPLY_PATCH)
        .args([
            work.join("pod.json"),
            work.join("answer.json"),
            work.join("patched.json"),
        ]));
    let patched: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("patched.json")).unwrap()).unwrap();

    // weft-init: its command and args, as the container runtime would run them.
    let init = container(&patched, "weft-init");
    let argv: Vec<&str> = init["command"]
        .as_array()
        .into_iter()
        .chain(init["args"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(argv[0], "weft-proxy");
    // With exactly the capabilities the patch grants (root, every other capability out of
    // the bounding set), as the container runtime would start it.
    let caps: Vec<String> = init["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    assert!(!caps.is_empty(), "weft-init adds its capabilities");
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let proxy_bin = weft_testkit::bin_path("weft-proxy");
    let proxy_bin = proxy_bin.to_str().expect("a UTF-8 path");
    let mut setpriv_args = vec!["--inh-caps=-all", bounding.as_str(), "--reuid=0", proxy_bin];
    setpriv_args.extend_from_slice(&argv[1..]);
    let o = net.run("pod", "setpriv", &setpriv_args);
    assert!(
        o.status.success(),
        "weft-init: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // The app.
    let mut app = net.command("pod", weft_testkit::bin_path("weft-demo-app"));
    app.args([
        "--name",
        "web",
        "--instance",
        "web-0",
        "--http",
        "0.0.0.0:8080",
    ]);
    let mut app = weft_testkit::ProcessGuard::spawn("demo-app[pod]", app);

    // The projected token volume: first a token of another ServiceAccount.
    let token_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        token_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let write_token = |token: &str| {
        let tmp = token_dir.path().join("..token.tmp");
        std::fs::write(&tmp, token).unwrap();
        std::fs::rename(&tmp, token_dir.path().join("token")).unwrap();
    };
    write_token(&mint(&key, &["token", "shop", "payments", "weft"]));

    // weft-proxy with the injected container's env; the volumes mounted where its mounts say
    // (a private tmpfs on /run for weft-run, the token directory bound in), its group the
    // proxy's (capture leaves it alone).
    let proxy = container(&patched, "weft-proxy");
    let mounts: Vec<&str> = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(mounts, ["/var/run/secrets/weft.io/token", "/var/run/weft"]);
    let uid = proxy["securityContext"]["runAsUser"].to_string();
    let script = format!(
        "set -e; mount -t tmpfs weft-run /run; mkdir -p /run/secrets/weft.io/token /run/weft; \
         mount --bind {tokens} /run/secrets/weft.io/token; \
         exec setpriv --regid {uid} --clear-groups {proxy_bin}",
        tokens = token_dir.path().display(),
        proxy_bin = weft_testkit::bin_path("weft-proxy").display(),
    );
    let mut cmd = net.command("pod", "sh");
    cmd.args(["-c", &script]).env_remove("WEFT_PROXY_CONFIG");
    for var in proxy["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("status.podIP") => pod_ip.to_string(),
            Some("metadata.name") => "web-0".to_owned(),
            Some("metadata.namespace") => "shop".to_owned(),
            Some(other) => panic!("unexpected downward-API field {other}"),
            None => var["value"].as_str().unwrap().to_owned(),
        };
        cmd.env(name, value);
    }
    let mut sidecar = weft_testkit::ProcessGuard::spawn("weft-proxy[pod]", cmd);

    // Refused: the token is ServiceAccount shop/payments, the pod's identity shop/web.
    // The kubelet and Prometheus reach the status port; the admin port is the pod's loopback's.
    let admin = format!("http://{pod_ip}:15020");
    wait_until(
        DEFAULT_WAIT,
        "the control plane refuses the other ServiceAccount's token",
        async || {
            if let Some(status) = sidecar.try_exit_status() {
                panic!(
                    "the injected proxy exited ({status})\n{}",
                    sidecar.describe()
                );
            }
            let m = webhook.cp.metrics().await;
            match m.get(
                "weft_control_certificates_issued_total",
                &[("result", "unauthenticated")],
            ) {
                Some(n) if n >= 1.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(
        webhook
            .cp
            .process
            .log()
            .contains("ServiceAccount shop/payments"),
        "{}",
        webhook.cp.process.log_tail(20)
    );
    let ready = weft_testkit::http_get(&format!("{admin}/ready"))
        .await
        .expect("GET /ready");
    assert_eq!(
        ready.status,
        503,
        "not ready without a certificate: {}",
        ready.summary()
    );

    // The kubelet rotates in the pod's own token: the proxy re-reads it, gets its certificate
    // and its config, and is ready.
    write_token(&mint(&key, &["token", "shop", "web", "weft"]));
    wait_until(
        DEFAULT_WAIT,
        "the injected proxy becomes ready",
        async || {
            if let Some(status) = sidecar.try_exit_status() {
                panic!(
                    "the injected proxy exited ({status})\n{}",
                    sidecar.describe()
                );
            }
            match weft_testkit::http_get(&format!("{admin}/ready")).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(r.summary()),
                Err(e) => Err(format!("{e:#}")),
            }
        },
    )
    .await;
    let proxies = webhook.cp.proxies().await;
    let me = proxies
        .as_array()
        .and_then(|p| p.iter().find(|p| p["id"] == "web-0.shop"))
        .unwrap_or_else(|| panic!("web-0.shop not registered: {proxies}"));
    assert_eq!(
        (me["service"].as_str(), me["namespace"].as_str()),
        (Some("web"), Some("shop")),
        "{me}"
    );
    assert_eq!(me["inbound_address"], format!("{pod_ip}:15006"), "{me}");
    assert!(
        sidecar.log().contains("serving the app's kubelet probes"),
        "{}",
        sidecar.log_tail(20)
    );
    // From outside the pod: metrics on the status port, but not what the proxy runs, and the
    // admin port (127.0.0.1 inside the pod) is not reachable.
    let metrics = weft_testkit::http_get(&format!("{admin}/metrics"))
        .await
        .expect("GET /metrics on the status port");
    assert_eq!(metrics.status, 200, "{}", metrics.summary());
    assert!(metrics.text().contains("weft_tls_handshakes_total"));
    for path in ["/config_dump", "/log_level"] {
        let r = weft_testkit::http_get(&format!("{admin}{path}"))
            .await
            .expect("GET on the status port");
        assert_eq!(r.status, 404, "{path} on the status port: {}", r.summary());
    }
    assert!(
        weft_testkit::http_get(&format!("http://{pod_ip}:15000/config_dump"))
            .await
            .is_err(),
        "the admin port answered from outside the pod"
    );

    // The rewritten probes, as the kubelet calls them (the pod IP, the status port), reach the
    // app; with the app gone they fail.
    let app_container = container(&patched, "web");
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &app_container[probe]["httpGet"];
        let url = format!(
            "http://{pod_ip}:{}{}",
            get["port"],
            get["path"].as_str().unwrap()
        );
        wait_until(DEFAULT_WAIT, &format!("{probe} {url} passes"), async || {
            match weft_testkit::http_get(&url).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(r.summary()),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await;
    }
    app.stop();
    let url = format!("http://{pod_ip}:15020/app-health/web/livez");
    let r = weft_testkit::http_get(&url).await.expect("GET livez");
    assert_eq!(r.status, 503, "{}", r.summary());
    assert!(r.text().contains("8080"), "{}", r.summary());
    sidecar.stop();
}
