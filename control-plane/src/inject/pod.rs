//! The pure part of the webhook: a Pod (and the config, the control plane's CA roots) in, an
//! RFC 6902 JSON Patch out, or the reason the pod is left alone or refused.
//!
//! What an injected pod gets (README "Kubernetes: what gets injected" says why):
//! - init container `weft-init` first: `weft-proxy init` installs the capture rules (as root
//!   with NET_ADMIN only, all other capabilities dropped, not privileged: the nf_tables backend
//!   needs nothing more);
//! - init container `weft-proxy` second, with `restartPolicy: Always` (a native sidecar): a
//!   startup probe on the proxy's `/ready` holds the app's containers (and the pod's own init
//!   containers, which come after it) until the proxy has its certificate and first config;
//!   it runs as `proxy.uid`, non-root, read-only root filesystem, no capabilities, no privilege
//!   escalation, RuntimeDefault seccomp;
//! - its bootstrap in `WEFT_BOOTSTRAP` (the pod's IP, name and namespace filled in by the proxy
//!   from downward-API env vars), the control plane's CA roots in `WEFT_CONTROL_PLANE_CA`, the
//!   app's probes in `WEFT_APP_PROBES`;
//! - volume `weft-token`: a projected ServiceAccount token (audience `identity.tokenAudience`,
//!   1 h, rotated by the kubelet) the proxy presents to Identity.Certify; volume `weft-run`
//!   (memory) for the CA file and the capture tools' lock;
//! - the app's httpGet / tcpSocket / grpc probes rewritten to the proxy ([`super::probes`]);
//! - annotation `weft.io/injected: <version>`.
//!
//! Left alone: pods opted out (`weft.io/inject: "false"`), already injected (the annotation, or
//! a container named like ours), and hostNetwork pods (their capture rules would capture the
//! node). Refused: pods whose annotations or names cannot make a working sidecar (the message
//! names the annotation or field).

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use super::config::{check_cidr, check_log_level, is_quantity, InjectConfig, ServiceFrom};
use super::probes::{self, AppProbes, ProbeKind, Rewrite};
use super::*;

/// Everything [`inject`] needs besides the pod.
#[derive(Debug, Clone, Copy)]
pub struct Injector<'a> {
    pub config: &'a InjectConfig,
    /// The control plane's CA roots (PEM), what the proxy verifies the control plane with.
    pub control_plane_ca: &'a str,
    /// The marker annotation's value.
    pub version: &'a str,
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Inject: the patch, and warnings for the user.
    Inject {
        patch: Vec<PatchOperation>,
        warnings: Vec<String>,
    },
    /// Admit it unchanged; `warning` is shown to the user (hostNetwork), `reason` is logged and
    /// answered as the status message.
    Skip { reason: String, warning: bool },
    /// Refuse the pod: its own settings cannot make a working sidecar.
    Refuse(String),
}

/// The capture and resource settings of one pod: the config's, overridden or extended by the
/// pod's annotations.
#[derive(Debug, Default)]
struct PodSettings {
    requests: BTreeMap<String, String>,
    limits: BTreeMap<String, String>,
    log_level: String,
    exclude_inbound_ports: BTreeSet<u16>,
    exclude_outbound_ports: BTreeSet<u16>,
    exclude_outbound_cidrs: Vec<String>,
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // Serializing k8s-openapi types to a JSON value cannot fail (no maps with non-string keys).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Decides what to do with `pod`, created in `namespace` (the AdmissionReview's namespace,
/// used when the pod's own is empty).
pub fn inject(pod: &Pod, namespace: &str, injector: &Injector<'_>) -> Outcome {
    let meta = &pod.metadata;
    let annotations = meta.annotations.clone().unwrap_or_default();
    let Some(spec) = pod.spec.as_ref() else {
        return Outcome::Skip {
            reason: "the pod has no spec".to_owned(),
            warning: false,
        };
    };
    if annotations.get(ANNOTATION_INJECT).map(String::as_str) == Some("false") {
        return Outcome::Skip {
            reason: format!("opted out ({ANNOTATION_INJECT}: \"false\")"),
            warning: false,
        };
    }
    let ours = |c: &Container| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER;
    if annotations.contains_key(ANNOTATION_INJECTED)
        || spec.containers.iter().any(ours)
        || spec.init_containers.iter().flatten().any(ours)
    {
        return Outcome::Skip {
            reason: "already injected".to_owned(),
            warning: false,
        };
    }
    if spec.host_network == Some(true) {
        return Outcome::Skip {
            reason:
                "weft: hostNetwork pod not injected (capture would redirect the node's traffic)"
                    .to_owned(),
            warning: true,
        };
    }
    match plan(pod, namespace, injector) {
        Ok((patch, warnings)) => Outcome::Inject { patch, warnings },
        Err(reason) => Outcome::Refuse(format!("weft: cannot inject the sidecar: {reason}")),
    }
}

fn settings(
    config: &InjectConfig,
    annotations: &BTreeMap<String, String>,
) -> Result<PodSettings, String> {
    let mut s = PodSettings {
        requests: config
            .proxy
            .resources
            .requests
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
        limits: config
            .proxy
            .resources
            .limits
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
        log_level: config.proxy.log_level.clone(),
        exclude_inbound_ports: config
            .capture
            .exclude_inbound_ports
            .iter()
            .copied()
            .collect(),
        exclude_outbound_ports: config
            .capture
            .exclude_outbound_ports
            .iter()
            .copied()
            .collect(),
        exclude_outbound_cidrs: config.capture.exclude_outbound_cidrs.clone(),
    };
    for (annotation, is_limit, resource) in [
        (ANNOTATION_CPU_REQUEST, false, "cpu"),
        (ANNOTATION_CPU_LIMIT, true, "cpu"),
        (ANNOTATION_MEMORY_REQUEST, false, "memory"),
        (ANNOTATION_MEMORY_LIMIT, true, "memory"),
    ] {
        if let Some(value) = annotations.get(annotation) {
            let value = value.trim();
            if !is_quantity(value) {
                return Err(format!(
                    "annotation {annotation}: {value:?} is not a Kubernetes quantity (e.g. 100m, 64Mi)"
                ));
            }
            let map = if is_limit {
                &mut s.limits
            } else {
                &mut s.requests
            };
            map.insert(resource.to_owned(), value.to_owned());
        }
    }
    if let Some(level) = annotations.get(ANNOTATION_LOG_LEVEL) {
        check_log_level(level.trim())
            .map_err(|e| format!("annotation {ANNOTATION_LOG_LEVEL}: {e}"))?;
        level.trim().clone_into(&mut s.log_level);
    }
    let ports = |annotation: &str| -> Result<Vec<u16>, String> {
        annotations
            .get(annotation)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                            format!("annotation {annotation}: {p:?} is not a port (1-65535)")
                        })
                    })
                    .collect()
            })
            .unwrap_or(Ok(Vec::new()))
    };
    s.exclude_inbound_ports
        .extend(ports(ANNOTATION_EXCLUDE_INBOUND_PORTS)?);
    s.exclude_outbound_ports
        .extend(ports(ANNOTATION_EXCLUDE_OUTBOUND_PORTS)?);
    if let Some(cidrs) = annotations.get(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS) {
        for cidr in cidrs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            check_cidr(cidr)
                .map_err(|e| format!("annotation {ANNOTATION_EXCLUDE_OUTBOUND_CIDRS}: {e}"))?;
            if !s.exclude_outbound_cidrs.iter().any(|c| c == cidr) {
                s.exclude_outbound_cidrs.push(cidr.to_owned());
            }
        }
    }
    Ok(s)
}

/// The service and namespace the proxy registers as, and why it may (see
/// [`crate::token::kubernetes`]: the control plane certifies a token as its ServiceAccount).
fn identity(pod: &Pod, namespace: &str, config: &InjectConfig) -> Result<(String, String), String> {
    let spec = pod.spec.as_ref();
    let namespace = pod
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(namespace);
    if !crate::ca::valid_name(namespace) {
        return Err(format!("namespace {namespace:?} is not a DNS label"));
    }
    let account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|a| !a.is_empty())
        .unwrap_or("default");
    let service = match config.identity.service_from {
        ServiceFrom::ServiceAccount => account.to_owned(),
        ServiceFrom::Label => {
            let key = &config.identity.service_label;
            let label = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(key))
                .ok_or_else(|| format!("label {key} (identity.serviceLabel) is missing"))?;
            if label != account {
                return Err(format!(
                    "label {key}={label:?} names the service, but the pod runs as ServiceAccount \
                     {account:?} and the control plane certifies a pod only as its \
                     ServiceAccount: give the pod serviceAccountName: {label}"
                ));
            }
            label.clone()
        }
    };
    if !crate::ca::valid_name(&service) {
        return Err(format!(
            "service {service:?} (from ServiceAccount {account:?}) is not a DNS label \
             ([a-z0-9-], at most 63): use a ServiceAccount named like the service"
        ));
    }
    Ok((service, namespace.to_owned()))
}

/// The app's TCP ports, announced as `transparent.app_ports`: declared container ports (and
/// those of the pod's own native sidecars), minus the proxy's ports and the excluded ones.
fn app_ports(pod: &Pod, excluded: &BTreeSet<u16>, warnings: &mut Vec<String>) -> Vec<u16> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let mut ports = BTreeSet::new();
    for c in spec.containers.iter().chain(sidecars) {
        for p in c.ports.iter().flatten() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let Some(port) = u16::try_from(p.container_port).ok().filter(|p| *p > 0) else {
                continue;
            };
            if RESERVED_PORTS.contains(&port) {
                warnings.push(format!(
                    "weft: container {} declares port {port}, which the sidecar uses: it is not announced",
                    c.name
                ));
                continue;
            }
            if !excluded.contains(&port) {
                ports.insert(port);
            }
        }
    }
    let mut ports: Vec<u16> = ports.into_iter().collect();
    if ports.len() > MAX_APP_PORTS {
        warnings.push(format!(
            "weft: {} app ports declared; only the first {MAX_APP_PORTS} are announced",
            ports.len()
        ));
        ports.truncate(MAX_APP_PORTS);
    }
    ports
}

/// Pod labels sent with the registration (subsets route on them), bounded as the control plane
/// admits them; per-pod hashes are left out.
fn node_labels(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, v)| {
            k.len() <= 128
                && v.len() <= 256
                && !matches!(
                    k.as_str(),
                    "pod-template-hash"
                        | "controller-revision-hash"
                        | "statefulset.kubernetes.io/pod-name"
                )
        })
        .take(32)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn plan(
    pod: &Pod,
    namespace: &str,
    injector: &Injector<'_>,
) -> Result<(Vec<PatchOperation>, Vec<String>), String> {
    let config = injector.config;
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let settings = settings(config, &annotations)?;
    let (service, namespace) = identity(pod, namespace, config)?;
    let mut warnings = Vec::new();
    let spec = pod.spec.as_ref().ok_or("the pod has no spec")?;
    let ports = app_ports(pod, &settings.exclude_inbound_ports, &mut warnings);

    // Probes first: the proxy needs them in its env.
    let mut probe_ops = Vec::new();
    let mut app_probes = AppProbes::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for kind in ProbeKind::ALL {
            match probes::rewrite(c, kind, STATUS_PORT) {
                Rewrite::Rewritten {
                    probe,
                    path,
                    original,
                } => {
                    let index = i.to_string();
                    probe_ops.push(PatchOperation::Replace(ReplaceOperation {
                        path: pointer(&["spec", "containers", &index, kind.field()]),
                        value: to_value(&probe),
                    }));
                    app_probes.insert(path, original);
                }
                Rewrite::Kept => {}
                Rewrite::Unresolvable(why) => {
                    warnings.push(format!("weft: probe not rewritten: {why}"));
                }
            }
        }
    }

    let bootstrap = bootstrap_yaml(injector, &service, &namespace, &ports, &node_labels(pod));
    let proxy = proxy_container(injector, &settings, bootstrap, &app_probes);
    let init = init_container(injector, &settings);

    let mut patch = Vec::new();
    match &pod.metadata.annotations {
        None => patch.push(add(
            &["metadata", "annotations"],
            json!({ ANNOTATION_INJECTED: injector.version }),
        )),
        Some(_) => patch.push(add(
            &["metadata", "annotations", ANNOTATION_INJECTED],
            json!(injector.version),
        )),
    }
    match &spec.init_containers {
        None => patch.push(add(
            &["spec", "initContainers"],
            json!([to_value(&init), to_value(&proxy)]),
        )),
        Some(_) => {
            // Inserted at the front, proxy first so the capture container ends up before it.
            patch.push(add(&["spec", "initContainers", "0"], to_value(&proxy)));
            patch.push(add(&["spec", "initContainers", "0"], to_value(&init)));
        }
    }
    let volumes = volumes(config);
    match &spec.volumes {
        None => patch.push(add(
            &["spec", "volumes"],
            Value::Array(volumes.iter().map(to_value).collect()),
        )),
        Some(_) => {
            for v in &volumes {
                patch.push(add(&["spec", "volumes", "-"], to_value(v)));
            }
        }
    }
    patch.extend(probe_ops);
    Ok((patch, warnings))
}

/// The proxy's bootstrap, with `${POD_IP}`, `${POD_NAME}` and `${POD_NAMESPACE}` for the proxy
/// to fill in from its downward-API env vars.
fn bootstrap_yaml(
    injector: &Injector<'_>,
    service: &str,
    namespace: &str,
    app_ports: &[u16],
    labels: &BTreeMap<String, String>,
) -> String {
    let mut bootstrap = json!({
        "node": {
            "service": service,
            "namespace": namespace,
            "id": "${POD_NAME}.${POD_NAMESPACE}",
        },
        "admin": format!("127.0.0.1:{ADMIN_PORT}"),
        "status": format!("0.0.0.0:{STATUS_PORT}"),
        "control_plane": injector.config.control_plane.address,
        "control_plane_ca": format!("{RUN_DIR}/{CA_FILE}"),
        "join_token_file": format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        "inbound": {"address": format!("${{POD_IP}}:{INBOUND_PORT}")},
        "outbound": {"address": format!("127.0.0.1:{OUTBOUND_PORT}"), "tcp_bind_ip": "127.0.0.1"},
        "transparent": {"instance_ip": "${POD_IP}", "app_ports": app_ports},
    });
    if !labels.is_empty() {
        bootstrap["node"]["labels"] = json!(labels);
    }
    // A JSON object of strings, numbers and arrays always serializes to YAML.
    serde_yaml::to_string(&bootstrap).unwrap_or_default()
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn resources(settings: &PodSettings) -> ResourceRequirements {
    let map = |m: &BTreeMap<String, String>| {
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|(k, v)| (k.clone(), K8sQuantity(v.clone())))
                .collect()
        })
    };
    ResourceRequirements {
        requests: map(&settings.requests),
        limits: map(&settings.limits),
        claims: None,
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(STATUS_PORT)),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

fn proxy_container(
    injector: &Injector<'_>,
    settings: &PodSettings,
    bootstrap: String,
    app_probes: &AppProbes,
) -> Container {
    let config = injector.config;
    let mut vars = vec![
        env_field("POD_IP", "status.podIP"),
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env(BOOTSTRAP_ENV, bootstrap),
        env(CONTROL_PLANE_CA_ENV, injector.control_plane_ca),
        env("RUST_LOG", settings.log_level.clone()),
    ];
    if !app_probes.is_empty() {
        // A map of plain data always serializes.
        vars.push(env(
            probes::APP_PROBES_ENV,
            serde_json::to_string(app_probes).unwrap_or_default(),
        ));
    }
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(config.proxy.image.clone()),
        image_pull_policy: Some(config.proxy.image_pull_policy.clone()),
        // A native sidecar: started before the app, stopped after it.
        restart_policy: Some("Always".to_owned()),
        env: Some(vars),
        ports: Some(vec![ContainerPort {
            name: Some("weft-status".to_owned()),
            container_port: i32::from(STATUS_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        // The app starts only once the proxy has its identity and first config (/ready).
        startup_probe: Some(http_probe("/ready", 1, 600)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        resources: Some(resources(settings)),
        security_context: Some(SecurityContext {
            run_as_user: Some(config.proxy.uid),
            run_as_group: Some(config.proxy.uid),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: RUN_VOLUME.to_owned(),
                mount_path: RUN_DIR.to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

fn join(values: impl IntoIterator<Item = String>) -> String {
    values.into_iter().collect::<Vec<_>>().join(",")
}

fn init_container(injector: &Injector<'_>, settings: &PodSettings) -> Container {
    let config = injector.config;
    let uid = config.proxy.uid.to_string();
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".to_owned(),
        uid.clone(),
        "--proxy-gid".to_owned(),
        uid,
        "--inbound-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--outbound-port".to_owned(),
        OUTBOUND_PORT.to_string(),
        "--admin-port".to_owned(),
        ADMIN_PORT.to_string(),
        "--dns-port".to_owned(),
        DNS_PORT.to_string(),
    ];
    for (flag, values) in [
        (
            "--exclude-inbound-ports",
            // The status port is the kubelet's and Prometheus's: never captured.
            join(
                std::iter::once(STATUS_PORT)
                    .chain(settings.exclude_inbound_ports.iter().copied())
                    .map(|p| p.to_string()),
            ),
        ),
        (
            "--exclude-outbound-ports",
            join(settings.exclude_outbound_ports.iter().map(u16::to_string)),
        ),
        (
            "--exclude-outbound-cidrs",
            join(settings.exclude_outbound_cidrs.iter().cloned()),
        ),
    ] {
        if !values.is_empty() {
            args.push(flag.to_owned());
            args.push(values);
        }
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(config.proxy.image.clone()),
        image_pull_policy: Some(config.proxy.image_pull_policy.clone()),
        command: Some(vec!["weft-proxy".to_owned()]),
        args: Some(args),
        resources: Some(resources(settings)),
        security_context: Some(SecurityContext {
            // iptables needs uid 0 with the capability in its effective set.
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        // The legacy iptables backend takes its lock in /run.
        volume_mounts: Some(vec![VolumeMount {
            name: RUN_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn volumes(config: &InjectConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                // Readable by the proxy's uid whatever the pod's fsGroup (the token proves no
                // more than the pod's own ServiceAccount).
                default_mode: Some(0o444),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(config.identity.token_audience.clone()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: TOKEN_FILE.to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
            }),
            ..Volume::default()
        },
        Volume {
            name: RUN_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                size_limit: Some(K8sQuantity("1Mi".to_owned())),
            }),
            ..Volume::default()
        },
    ]
}
