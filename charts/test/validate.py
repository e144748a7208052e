#!/usr/bin/env python3
"""Offline validation of the Helm chart charts/weft (no API server can run here).

Every case renders the chart with Helm's own library (PyPI helm-python-sdk: Helm 4's Go code behind
a C ABI, so `values.schema.json`, `fail`, `lookup` and the template functions behave exactly as in
`helm install`), and checks what it rendered:

  lint      helm lint (strict) of the chart for every values set, for each Kubernetes version
  render:*  every manifest of a values set validated with `kubernetes-validate --strict` for each
            Kubernetes version (the Prometheus Operator kinds, which it has no schema for, are
            checked here: promtool on the rules, selectors and ports against the Service), plus
            what that set must produce (see CASES)
  bad:*     values that must be refused, with the message they must be refused with
  docs      every leaf of values.yaml is documented in README.md and described by the schema
  flags     every flag the chart passes to weft-control exists in `weft-control serve --help`
  kept      generated keys and certificates are reused from the cluster's Secrets (`lookup`)
            and generated only when absent: rendered through a parent chart that hands the
            chart's own templates a stand-in for the cluster's answer
  run:*     the real weft-control started with exactly the rendered args, env and volumes (the
            Secrets and ConfigMaps written out as the kubelet does, paths under a temporary
            root, 0.0.0.0 listeners moved to free loopback ports): its probes answer, its
            certificates verify for the Service's DNS names against the chart's CA and caBundle,
            the generated admin tokens work; `run:ha` starts two replicas against a real etcd

Prints one line per case (`ok: <case> ...` or `FAILED: <case>: <reason>`) and a closing
`N passed, N failed` line; exit status 0 only if every case passed.

Usage: validate.py [--bin-dir DIR] [--only PREFIX]...
  --bin-dir  where weft-control lives (default: <repo>/target/debug); needed by flags and run:*
  --only     run only the cases whose name starts with PREFIX (repeatable)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

try:
    import helm_python as helm
except ImportError as e:  # the caller (e2e/tests/helm_chart.rs) installs it: say how
    sys.exit(f"validate.py: {e}: run charts/test/install-venv.sh and use its python")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "weft"
RELEASE = "weft"
NAMESPACE = "weft-system"
SERVICE_DNS = [
    "weft-control",
    "weft-control.weft-system",
    "weft-control.weft-system.svc",
    "weft-control.weft-system.svc.cluster.local",
]
KUBE_VERSIONS = ["1.29", "1.33"]
# Kinds kubernetes-validate has no schema for; checked by check_monitoring instead.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
# The inject.yaml interface fixed between the chart and the webhook (control-plane/src/inject/).
INJECT_KEYS = {
    "proxy": {"image", "imagePullPolicy", "uid", "logLevel", "resources"},
    "controlPlane": {"address"},
    "identity": {"serviceFrom", "serviceLabel", "tokenAudience"},
    "capture": {"excludeInboundPorts", "excludeOutboundPorts", "excludeOutboundCIDRs"},
}
WAIT = 30.0  # deadline of every wait on a started process, seconds


class CaseFailed(Exception):
    pass


def check(cond: Any, msg: str) -> None:
    if not cond:
        raise CaseFailed(msg)


# ---------------------------------------------------------------------------------------------
# Rendering


class Rendered:
    """The manifests of one render, by kind and name."""

    def __init__(self, files: dict[str, str]):
        self.notes = ""
        self.docs: list[dict] = []
        for path, text in sorted(files.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    check(isinstance(doc, dict), f"{path}: a document that is not a mapping")
                    doc["__file"] = path
                    self.docs.append(doc)

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> dict:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        check(len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}")
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(d["metadata"]["name"] == name for d in self.all(kind))

    def secret_data(self, name: str) -> dict[str, bytes]:
        s = self.get("Secret", name)
        return {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}

    def container(self) -> dict:
        dep = self.get("Deployment", "weft-control")
        containers = dep["spec"]["template"]["spec"]["containers"]
        check(len(containers) == 1, f"{len(containers)} containers in the Deployment")
        return containers[0]

    def args(self) -> list[str]:
        return [str(a) for a in self.container()["args"]]

    def arg(self, flag: str) -> list[str]:
        return [a.split("=", 1)[1] for a in self.args() if a.startswith(flag + "=")]

    def clean(self) -> list[dict]:
        return [{k: v for k, v in d.items() if k != "__file"} for d in self.docs]


def render(values: dict, chart: Path = CHART) -> Rendered:
    with helm.Chart.load(str(chart)) as c:
        files = c.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return Rendered(files)


def render_error(values: dict) -> str:
    """The error a render with `values` fails with ("" if it renders)."""
    try:
        render(values)
    except helm.HelmError as e:
        return str(e)
    return ""


# ---------------------------------------------------------------------------------------------
# Checks every render gets


def kubernetes_validate(r: Rendered, tmp: Path) -> str:
    """kubernetes-validate --strict on every manifest, for every version in KUBE_VERSIONS."""
    path = tmp / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(r.clean(), sort_keys=False))
    crds = sum(1 for d in r.docs if d["kind"] in CRD_KINDS)
    native = len(r.docs) - crds
    exe = Path(sys.executable).parent / "kubernetes-validate"
    for version in KUBE_VERSIONS:
        out = subprocess.run(
            [str(exe), "--strict", "-k", version, str(path)],
            capture_output=True, text=True, timeout=120,
        )
        lines = out.stdout.splitlines()
        passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
        warned = [line for line in lines if line.startswith("WARN")]
        problems = [line for line in lines if not line.startswith(("INFO", "WARN"))]
        check(out.returncode == 0 and not problems,
              f"kubernetes-validate --strict -k {version}: exit {out.returncode}: "
              + " | ".join(problems or lines[-5:]) + out.stderr[-500:])
        check(len(passed) == native,
              f"kubernetes-validate -k {version}: {len(passed)} of {native} native manifests passed")
        for w in warned:
            check(any(f"kind {k} " in w for k in CRD_KINDS), f"kubernetes-validate: {w}")
        check(len(warned) == crds, f"kubernetes-validate: {len(warned)} warnings for {crds} CRD objects")
    return f"{native} manifests x {len(KUBE_VERSIONS)} versions"


def check_common(r: Rendered, values: dict) -> None:
    """What every render must hold, whatever the values."""
    for d in r.docs:
        if d["kind"] != "MutatingWebhookConfiguration":
            check(d["metadata"].get("namespace") == NAMESPACE,
                  f"{d['kind']}/{d['metadata']['name']}: not in the release namespace")
    dep = r.get("Deployment", "weft-control")
    pod = dep["spec"]["template"]["spec"]
    c = r.container()
    psc, sc = pod["securityContext"], c["securityContext"]
    check(psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, "pod not non-root")
    check(psc["seccompProfile"]["type"] == "RuntimeDefault", "pod seccomp not RuntimeDefault")
    check(sc["readOnlyRootFilesystem"] is True, "root filesystem not read-only")
    check(sc["allowPrivilegeEscalation"] is False, "privilege escalation allowed")
    check(sc["capabilities"] == {"drop": ["ALL"]}, f"capabilities {sc['capabilities']}")
    check(pod["automountServiceAccountToken"] is False, "the control plane mounts an API token")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        check(get == {"path": path, "port": "admin", "scheme": "HTTPS"}, f"{probe}: {get}")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports.get("grpc") == 15010 and ports.get("admin") == 15011, f"container ports {ports}")
    check(r.arg("--grpc") == ["0.0.0.0:15010"] and r.arg("--admin") == ["0.0.0.0:15011"],
          "listen addresses")
    check(set(r.arg("--tls-san")) >= set(SERVICE_DNS), f"--tls-san {r.arg('--tls-san')}")
    check("--no-admin-bootstrap-token" in r.args(), "per-pod bootstrap token not disabled")
    # Every mount has its volume; every Secret/ConfigMap volume names a rendered object or one
    # the values say exists.
    volumes = {v["name"]: v for v in pod["volumes"]}
    existing = existing_objects(values)
    for m in c["volumeMounts"]:
        check(m["name"] in volumes, f"volumeMount {m['name']} has no volume")
    for v in volumes.values():
        if "secret" in v:
            name = v["secret"]["secretName"]
            check(r.has("Secret", name) or ("Secret", name) in existing,
                  f"volume {v['name']}: Secret {name} is neither rendered nor given")
            if r.has("Secret", name):
                data = r.secret_data(name)
                for item in v["secret"].get("items", []):
                    check(item["key"] in data, f"Secret {name} lacks key {item['key']}")
        if "configMap" in v:
            name = v["configMap"]["name"]
            check(r.has("ConfigMap", name) or ("ConfigMap", name) in existing,
                  f"volume {v['name']}: ConfigMap {name} is neither rendered nor given")
    for arg in r.args():
        for prefix in ("/etc/weft/", "/var/lib/weft/"):
            if "=" in arg and arg.split("=", 1)[1].startswith(prefix):
                path = arg.split("=", 1)[1]
                check(any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
                          for m in c["volumeMounts"]), f"{arg}: not under any volumeMount")
    svc = r.get("Service", "weft-control")
    sel = svc["spec"]["selector"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in sel.items()), "the Service does not select the pods")
    check(dep["spec"]["selector"]["matchLabels"] == sel, "Deployment and Service selectors differ")
    replicas = values.get("replicas", 1)
    check(dep["spec"]["replicas"] == replicas, "replicas")
    check(r.has("PodDisruptionBudget", "weft-control") == (replicas > 1),
          "a PodDisruptionBudget exactly when replicas > 1")
    check("weftctl" in r.notes and " check" in r.notes, "NOTES.txt does not tell how to run weftctl check")


def existing_objects(values: dict) -> set[tuple[str, str]]:
    """The objects the values say the user created."""
    out = set()
    for path, kind in ((("ca", "existingSecret"), "Secret"), (("admin", "existingSecret"), "Secret"),
                       (("webhook", "tls", "existingSecret"), "Secret"),
                       (("store", "etcd", "tlsSecret"), "Secret"),
                       (("store", "etcd", "passwordSecret"), "Secret"),
                       (("policies", "existingConfigMap"), "ConfigMap"),
                       (("injection", "tokenVerification", "jwksConfigMap"), "ConfigMap")):
        v: Any = values
        for k in path:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        if v:
            out.add((kind, v))
    return out


def pem_text(b: bytes) -> str:
    return b.decode()


def openssl(args: list[str], stdin: bytes | None = None) -> str:
    out = subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=30)
    check(out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr.decode()[-300:]}")
    return out.stdout.decode()


def check_cert(cert: bytes, ca: bytes, tmp: Path, names: list[str]) -> None:
    """cert chains to ca and names every DNS name in names."""
    (tmp / "c.pem").write_bytes(cert)
    (tmp / "ca.pem").write_bytes(ca)
    openssl(["verify", "-CAfile", str(tmp / "ca.pem"), str(tmp / "c.pem")])
    san = openssl(["x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp / "c.pem")])
    for n in names:
        check(f"DNS:{n}" in san, f"certificate lacks DNS:{n}: {san.strip()}")


def check_webhook(r: Rendered, values: dict, tmp: Path) -> None:
    inj = values.get("injection", {})
    mwc = r.get("MutatingWebhookConfiguration")
    hooks = {h["name"]: h for h in mwc["webhooks"]}
    expected = {"inject.weft.io"} | ({"pods.inject.weft.io"} if inj.get("podOptIn") else set())
    check(set(hooks) == expected, f"webhooks {sorted(hooks)}")
    mode = values.get("webhook", {}).get("tls", {}).get("mode", "generate")
    for h in hooks.values():
        cc = h["clientConfig"]
        check(cc["service"] == {"name": "weft-control", "namespace": NAMESPACE, "path": "/inject",
                                "port": 15017}, f"{h['name']}: clientConfig.service {cc['service']}")
        check(h["admissionReviewVersions"] == ["v1"] and h["sideEffects"] == "None"
              and h["reinvocationPolicy"] == "IfNeeded", f"{h['name']}: review versions/side effects")
        check(h["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}], f"{h['name']}: rules")
        check(h["failurePolicy"] == inj.get("failurePolicy", "Fail"), "failurePolicy")
        # Never its own namespace nor kube-system, whatever failurePolicy is.
        never = [e for e in h["namespaceSelector"]["matchExpressions"]
                 if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"]
        check(never and {NAMESPACE, "kube-system"} <= set(never[0]["values"]),
              f"{h['name']}: the release namespace or kube-system is not excluded")
        for ns in inj.get("excludeNamespaces", []):
            check(ns in never[0]["values"], f"{h['name']}: {ns} not excluded")
        if mode == "certManager":
            check("caBundle" not in cc, "certManager mode: caBundle must be left to cainjector")
        else:
            check(cc.get("caBundle"), f"{h['name']}: no caBundle")
    main = hooks["inject.weft.io"]["namespaceSelector"]["matchExpressions"]
    check({"key": "weft.io/inject", "operator": "In", "values": ["enabled"]} in main,
          "inject.weft.io does not select weft.io/inject=enabled namespaces")
    ca = base64.b64decode(hooks["inject.weft.io"]["clientConfig"].get("caBundle", ""))
    if mode == "generate":
        tls = r.secret_data("weft-webhook-tls")
        check(tls["ca.crt"] == ca, "caBundle is not the generated Secret's ca.crt")
        check_cert(tls["tls.crt"], ca, tmp, SERVICE_DNS)
        check(b"PRIVATE KEY" in tls["tls.key"], "webhook key is not PEM")
    elif mode == "secret":
        check(ca.decode() == values["webhook"]["tls"]["caBundle"], "caBundle is not the given PEM")
    elif mode == "certManager":
        ann = mwc["metadata"].get("annotations", {})
        check(ann.get("cert-manager.io/inject-ca-from")
              == f"{NAMESPACE}/{values['webhook']['tls']['certManagerCertificate']}",
              f"inject-ca-from annotation {ann}")
    # inject.yaml: exactly the interface's fields, and what the values say.
    cm = r.get("ConfigMap", "weft-inject")
    conf = yaml.safe_load(cm["data"]["inject.yaml"])
    check(set(conf) == set(INJECT_KEYS), f"inject.yaml top-level keys {sorted(conf)}")
    for k, keys in INJECT_KEYS.items():
        check(set(conf[k]) == keys, f"inject.yaml {k}: keys {sorted(conf[k])}")
    check(conf["controlPlane"]["address"] == "https://weft-control.weft-system.svc:15010",
          f"controlPlane.address {conf['controlPlane']['address']}")
    check(conf["controlPlane"]["address"].split("//")[1].split(":")[0] in r.arg("--tls-san"),
          "the address injected proxies dial is not in the server certificate")
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    image = inj.get("proxy", {}).get("image", {})
    want = f"{image.get('repository', 'weft/weft-proxy')}:{image.get('tag') or app_version}"
    check(conf["proxy"]["image"] == want, f"proxy image {conf['proxy']['image']} (want {want})")
    c = r.container()
    for flag, path in (("--inject-addr", "0.0.0.0:15017"),
                       ("--inject-tls-cert", "/etc/weft/webhook/tls.crt"),
                       ("--inject-tls-key", "/etc/weft/webhook/tls.key"),
                       ("--inject-config", "/etc/weft/inject/inject.yaml")):
        check(r.arg(flag) == [path], f"{flag}: {r.arg(flag)}")
    check(("--inject-fail-closed" in r.args()) == (inj.get("failurePolicy", "Fail") == "Fail"),
          "--inject-fail-closed exactly when failurePolicy is Fail")
    check({"name": "webhook", "containerPort": 15017, "protocol": "TCP"} in c["ports"], "webhook port")
    svc_ports = {p["name"]: p for p in r.get("Service", "weft-control")["spec"]["ports"]}
    check(svc_ports["webhook"]["port"] == 15017, "Service webhook port")


def check_no_injection(r: Rendered) -> None:
    check(not r.all("MutatingWebhookConfiguration"), "injection off: a webhook is rendered")
    check(not r.has("ConfigMap", "weft-inject"), "injection off: inject ConfigMap rendered")
    check(not r.has("Secret", "weft-webhook-tls"), "injection off: webhook Secret rendered")
    check(not any(a.startswith("--inject") for a in r.args()), "injection off: --inject-* flags")
    ports = [p["name"] for p in r.get("Service", "weft-control")["spec"]["ports"]]
    check(ports == ["grpc", "admin"], f"injection off: Service ports {ports}")


def check_monitoring(r: Rendered, tmp: Path) -> None:
    svc = r.get("Service", "weft-control")
    sm = r.get("ServiceMonitor")
    sel = sm["spec"]["selector"]["matchLabels"]
    check(all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items()),
          f"ServiceMonitor selector {sel} does not match the Service's labels")
    check(sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}, "ServiceMonitor namespaces")
    ep = sm["spec"]["endpoints"][0]
    check(ep["port"] in [p["name"] for p in svc["spec"]["ports"]], f"no Service port {ep['port']}")
    check(ep["scheme"] == "https" and ep["path"] == "/metrics", "ServiceMonitor scheme/path")
    check(ep["tlsConfig"]["serverName"] in r.arg("--tls-san"), "scraped name not in the certificate")
    ca = ep["tlsConfig"]["ca"]["secret"]
    check(ca["key"] in r.secret_data(ca["name"]), f"Secret {ca['name']} lacks {ca['key']}")
    cred = ep["authorization"]["credentials"]
    tokens = r.secret_data(cred["name"])
    check(f"metrics read {tokens[cred['key']].decode()}" in tokens["tokens"].decode(),
          "the ServiceMonitor's token is not a read token of --admin-tokens")
    check({"targetLabel": "job", "replacement": "weft-control"} in ep["relabelings"], "job label")
    pm = r.get("PodMonitor")
    pep = pm["spec"]["podMetricsEndpoints"][0]
    check(pep["port"] == "weft-status" and {"targetLabel": "job", "replacement": "weft-proxy"}
          in pep["relabelings"], f"PodMonitor endpoint {pep}")
    check(pm["spec"]["namespaceSelector"] == {"any": True}, "PodMonitor namespaces")
    # The PrometheusRule carries alerts/weft-rules.yaml unchanged, and promtool accepts it.
    rule = r.get("PrometheusRule")
    source = yaml.safe_load((CHART / "alerts" / "weft-rules.yaml").read_text())
    check(rule["spec"] == source, "PrometheusRule spec differs from alerts/weft-rules.yaml")
    rules_file = tmp / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    promtool = shutil.which("promtool")
    check(promtool, "promtool not found (Debian package prometheus: scripts/install-test-deps.sh)")
    out = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True,
                         text=True, timeout=60)
    check(out.returncode == 0, f"promtool check rules: {out.stdout[-400:]}{out.stderr[-400:]}")
    dash = r.get("ConfigMap", "weft-dashboard")
    check(dash["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard sidecar label")
    check(json.loads(dash["data"]["weft-mesh.json"])
          == json.loads((CHART / "dashboards" / "weft-mesh.json").read_text()),
          "dashboard ConfigMap differs from dashboards/weft-mesh.json")


# ---------------------------------------------------------------------------------------------
# Values sets


def example_policies() -> dict[str, str]:
    d = REPO / "config-examples" / "policies"
    return {p.name: p.read_text() for p in sorted(d.glob("*.yaml"))}


def test_root(tmp: Path) -> tuple[bytes, bytes]:
    """A user's own root (ECDSA P-256, PKCS#8), as `ca.existingSecret` would hold it."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, crt = tmp / "root-key.pem", tmp / "root.pem"
    openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(crt), "-days", "365", "-subj", "/CN=user root",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    return crt.read_bytes(), key.read_bytes()


def byo_values(tmp: Path) -> dict:
    crt, _ = test_root(tmp)
    return {
        "ca": {"existingSecret": "my-root"},
        "admin": {"existingSecret": "my-admin-tokens"},
        "webhook": {"tls": {"mode": "secret", "existingSecret": "my-webhook-tls",
                            "caBundle": crt.decode()}},
    }


def jwks(tmp: Path) -> str:
    """A JWKS with one real EC P-256 public key, the shape `kubectl get --raw /openid/v1/jwks`
    prints."""
    tmp.mkdir(parents=True, exist_ok=True)
    key = tmp / "sa-key.pem"
    openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)])
    der = subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-outform", "DER"],
                         capture_output=True, timeout=30).stdout
    point = der[-65:]
    check(point[0] == 4, "not an uncompressed EC point")

    def b64u(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    return json.dumps({"keys": [{"use": "sig", "kty": "EC", "kid": "test", "crv": "P-256",
                                 "alg": "ES256", "x": b64u(point[1:33]), "y": b64u(point[33:])}]})


HA = {
    "replicas": 3,
    "store": {"type": "etcd", "etcd": {
        "endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"],
        "tlsSecret": "etcd-client", "clientCert": True,
        "user": "weft", "passwordSecret": "etcd-password"}},
}

MONITORING = {"monitoring": {
    "serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}}


def case_default(r: Rendered, values: dict, tmp: Path) -> str:
    check(r.kinds() == sorted(["ConfigMap", "ConfigMap", "Deployment",
                               "MutatingWebhookConfiguration", "Secret", "Secret", "Secret",
                               "Secret", "Service", "ServiceAccount"]), f"kinds {r.kinds()}")
    check(not r.all("Role") and not r.all("ClusterRole"), "RBAC rendered")
    check(r.arg("--store") == ["files"] and r.arg("--policies") == ["/etc/weft/policies"], "store")
    check(r.arg("--root-cert") == ["/etc/weft/ca-root/tls.crt"], "--root-cert")
    ca = r.secret_data("weft-ca")
    check(b"BEGIN PRIVATE KEY" in ca["tls.key"], "generated root key is not PKCS#8")
    openssl(["x509", "-noout", "-in", "/dev/stdin"], ca["tls.crt"])
    key = r.secret_data("weft-join-key")["token.key"].decode().strip()
    check(re.fullmatch(r"[A-Za-z0-9_-]{43}", key), f"token.key is not 32 bytes base64url: {key!r}")
    for name in ("weft-ca", "weft-join-key", "weft-admin-tokens", "weft-webhook-tls"):
        ann = r.get("Secret", name)["metadata"].get("annotations", {})
        check(ann.get("helm.sh/resource-policy") == "keep", f"Secret {name} not kept on uninstall")
    aff = r.get("Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    check("preferredDuringSchedulingIgnoredDuringExecution" in aff, "no anti-affinity")
    check_webhook(r, values, tmp)
    check(not r.arg("--k8s-jwks") and "WARNING: injection.tokenVerification has no keys" in r.notes,
          "without keys: no --k8s-* flags, and NOTES.txt must warn")
    return "files store, generated CA and webhook certificate, injection on"


def case_byo(r: Rendered, values: dict, tmp: Path) -> str:
    check(not r.has("Secret", "weft-ca"), "BYO CA: the chart still generates a root")
    check(not r.has("Secret", "weft-admin-tokens"), "BYO admin tokens: generated anyway")
    check(not r.has("Secret", "weft-webhook-tls"), "BYO webhook TLS: generated anyway")
    vols = {v["name"]: v for v in r.get("Deployment")["spec"]["template"]["spec"]["volumes"]}
    check(vols["ca-root"]["secret"]["secretName"] == "my-root", "ca-root volume")
    check(vols["admin-tokens"]["secret"]["secretName"] == "my-admin-tokens", "admin volume")
    check(vols["webhook-tls"]["secret"]["secretName"] == "my-webhook-tls", "webhook volume")
    check(r.has("Secret", "weft-join-key"), "token.key is generated in every mode")
    check_webhook(r, values, tmp)
    return "ca, admin tokens and webhook certificate from the user's Secrets"


def case_ha(r: Rendered, values: dict, tmp: Path) -> str:
    pdb = r.get("PodDisruptionBudget", "weft-control")
    check(pdb["spec"]["maxUnavailable"] == 1, "PDB maxUnavailable")
    check(pdb["spec"]["selector"]["matchLabels"]
          == r.get("Deployment")["spec"]["selector"]["matchLabels"], "PDB selector")
    check(r.arg("--store") == ["etcd"] and not r.arg("--policies"), "etcd store args")
    check(r.arg("--etcd-endpoints") == ["https://etcd-0.etcd:2379,https://etcd-1.etcd:2379"],
          "--etcd-endpoints")
    check(r.arg("--replica-id") == ["$(POD_NAME)"], "--replica-id")
    check(r.arg("--etcd-cert") == ["/etc/weft/etcd-tls/tls.crt"], "--etcd-cert")
    check(r.arg("--etcd-password-file") == ["/etc/weft/etcd-auth/password"], "--etcd-password-file")
    check(not r.has("ConfigMap", "weft-policies"), "etcd: a policy ConfigMap is rendered")
    check_webhook(r, values, tmp)
    return "3 replicas on etcd (TLS client certificate, user), PodDisruptionBudget"


def case_monitoring(r: Rendered, values: dict, tmp: Path) -> str:
    check_monitoring(r, tmp)
    return "ServiceMonitor, PodMonitor, PrometheusRule (promtool check rules), dashboard ConfigMap"


def case_injection_off(r: Rendered, values: dict, tmp: Path) -> str:
    check_no_injection(r)
    return "no webhook, no inject ConfigMap, no --inject-* flags"


def case_existing_policies(r: Rendered, values: dict, tmp: Path) -> str:
    check(not r.has("ConfigMap", "weft-policies"), "a policy ConfigMap is rendered anyway")
    vols = {v["name"]: v for v in r.get("Deployment")["spec"]["template"]["spec"]["volumes"]}
    check(vols["policies"]["configMap"]["name"] == "mesh-policies", "policies volume")
    return "the user's ConfigMap is the policy directory"


def case_inline_policies(r: Rendered, values: dict, tmp: Path) -> str:
    data = r.get("ConfigMap", "weft-policies")["data"]
    check(data == values["policies"]["files"], "policy files differ from the values")
    return f"{len(data)} policy files from config-examples/policies in the ConfigMap"


def case_cert_manager(r: Rendered, values: dict, tmp: Path) -> str:
    check(not r.has("Secret", "weft-webhook-tls"), "certManager: a webhook Secret is generated")
    check_webhook(r, values, tmp)
    return "cainjector annotation, no caBundle"


def case_token_verification(r: Rendered, values: dict, tmp: Path) -> str:
    tv = values["injection"]["tokenVerification"]
    check(r.arg("--k8s-jwks") == ["/etc/weft/k8s/jwks.json"], f"--k8s-jwks {r.arg('--k8s-jwks')}")
    check(r.arg("--k8s-issuer") == [tv.get("issuer", "https://kubernetes.default.svc.cluster.local")],
          "--k8s-issuer")
    check(r.arg("--k8s-audience") == ["weft"], "--k8s-audience is not identity.tokenAudience")
    conf = yaml.safe_load(r.get("ConfigMap", "weft-inject")["data"]["inject.yaml"])
    check(conf["identity"]["tokenAudience"] == "weft", "the injected audience differs")
    vols = {v["name"]: v for v in r.get("Deployment")["spec"]["template"]["spec"]["volumes"]}
    if tv.get("jwks"):
        check(json.loads(r.get("ConfigMap", "weft-k8s-jwks")["data"]["jwks.json"])
              == json.loads(tv["jwks"]), "jwks ConfigMap")
        check(vols["k8s-jwks"]["configMap"]["name"] == "weft-k8s-jwks", "jwks volume")
    else:
        check(not r.has("ConfigMap", "weft-k8s-jwks"), "a jwks ConfigMap is rendered anyway")
        check(vols["k8s-jwks"]["configMap"]["name"] == tv["jwksConfigMap"], "jwks volume")
    check("WARNING" not in r.notes, "NOTES.txt warns about missing keys")
    return "--k8s-jwks/--k8s-issuer/--k8s-audience from the values, keys mounted"


def case_opt_in(r: Rendered, values: dict, tmp: Path) -> str:
    check_webhook(r, values, tmp)
    hook = {h["name"]: h for h in r.get("MutatingWebhookConfiguration")["webhooks"]}
    opt = hook["pods.inject.weft.io"]
    check(opt["objectSelector"] == {"matchLabels": {"weft.io/inject": "true"}}, "opt-in selector")
    return "second webhook for labelled pods, Ignore failure policy, excluded namespaces, own proxy image"


def render_cases(tmp: Path) -> list[tuple[str, dict, Callable[[Rendered, dict, Path], str]]]:
    return [
        ("default", {}, case_default),
        ("byo-ca", byo_values(tmp), case_byo),
        ("ha-etcd", HA, case_ha),
        ("monitoring", MONITORING, case_monitoring),
        ("injection-off", {"injection": {"enabled": False}}, case_injection_off),
        ("existing-policies", {"policies": {"existingConfigMap": "mesh-policies"}},
         case_existing_policies),
        ("inline-policies", {"policies": {"files": example_policies()}}, case_inline_policies),
        ("cert-manager", {"webhook": {"tls": {"mode": "certManager",
                                              "existingSecret": "weft-webhook-cm",
                                              "certManagerCertificate": "weft-webhook"}}},
         case_cert_manager),
        ("token-verification", {"injection": {"tokenVerification": {
            "jwks": jwks(tmp / "jwks"), "issuer": "https://oidc.example.com/cluster"}}},
         case_token_verification),
        ("token-verification-configmap", {"injection": {"tokenVerification": {
            "jwksConfigMap": "cluster-jwks"}}}, case_token_verification),
        ("pod-opt-in", {"injection": {"podOptIn": True, "failurePolicy": "Ignore",
                                      "excludeNamespaces": ["legacy", "monitoring"],
                                      "proxy": {"image": {"repository": "registry.example.com/weft-proxy",
                                                          "tag": "0.1.0-rc.1"}}}}, case_opt_in),
    ]


# Values that must be refused, and a piece of the message they must be refused with.
BAD_VALUES: list[tuple[str, dict, str]] = [
    ("typo-top-level", {"replica": 3}, "additional properties 'replica' not allowed"),
    ("typo-nested", {"injection": {"proxy": {"imag": "x"}}}, "additional properties 'imag' not allowed"),
    ("typo-monitoring", {"monitoring": {"serviceMonitor": {"enable": True}}},
     "additional properties 'enable' not allowed"),
    ("replicas-with-file-store", {"replicas": 3},
     "replicas=3 needs store.type=etcd: the file store"),
    ("wrong-type-replicas", {"replicas": "three"}, "got string, want integer"),
    ("wrong-type-enabled", {"injection": {"enabled": "yes"}}, "got string, want boolean"),
    ("bad-enum-store", {"store": {"type": "consul"}}, "/store/type"),
    ("bad-duration", {"certTTL": "1 day"}, "/certTTL"),
    ("bad-port", {"injection": {"capture": {"excludeInboundPorts": [70000]}}},
     "/injection/capture/excludeInboundPorts/0"),
    ("bad-policy-file-name", {"policies": {"files": {"../evil": "x"}}}, "invalid propertyName '../evil'"),
    ("etcd-without-endpoints", {"store": {"type": "etcd"}}, "store.type=etcd needs store.etcd.endpoints"),
    ("etcd-with-policy-files", {"store": {"type": "etcd", "etcd": {"endpoints": ["http://e:2379"]}},
                                "policies": {"files": {"a.yaml": "mesh: {}"}}},
     "the policies live in etcd"),
    ("policies-both", {"policies": {"files": {"a.yaml": "x"}, "existingConfigMap": "p"}},
     "policies.files and policies.existingConfigMap are exclusive"),
    ("webhook-secret-without-ca", {"webhook": {"tls": {"mode": "secret", "existingSecret": "w"}}},
     "webhook.tls.mode=secret needs"),
    ("cert-manager-without-certificate", {"webhook": {"tls": {"mode": "certManager"}}},
     "webhook.tls.mode=certManager needs"),
    ("etcd-client-cert-without-secret",
     {"store": {"type": "etcd", "etcd": {"endpoints": ["http://e:2379"], "clientCert": True}}},
     "store.etcd.clientCert needs store.etcd.tlsSecret"),
    ("jwks-not-json", {"injection": {"tokenVerification": {"jwks": "not a jwks"}}},
     "injection.tokenVerification.jwks is not a JWKS"),
    ("jwks-both", {"injection": {"tokenVerification": {"jwks": '{"keys": []}', "jwksConfigMap": "x"}}},
     "jwks and jwksConfigMap are exclusive"),
    ("root-proxy-uid", {"injection": {"proxy": {"uid": 0}}}, "/injection/proxy/uid"),
    ("bad-extra-arg", {"extraArgs": ["rm -rf"]}, "/extraArgs/0"),
]


# ---------------------------------------------------------------------------------------------
# Cases without a render of their own


def case_lint(sets: list[tuple[str, dict]]) -> str:
    n = 0
    for name, values in sets:
        for version in KUBE_VERSIONS:
            report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                               kube_version=f"v{version}.0")
            bad = [m for m in report["messages"] if m["severity"] >= 2]
            # strict turns warnings into errors; "icon is recommended" is info (severity 1).
            check(not report["errors"] and not bad,
                  f"helm lint ({name}, {version}): {report['errors'] or bad}")
            n += 1
    return f"{n} lint runs ({len(sets)} values sets x {len(KUBE_VERSIONS)} versions), no warning"


def values_leaves(v: Any, prefix: str = "") -> list[str]:
    if isinstance(v, dict) and v:
        out = []
        for k, sub in v.items():
            out += values_leaves(sub, f"{prefix}.{k}" if prefix else k)
        return out
    return [prefix]


def schema_has(schema: dict, path: str) -> bool:
    node = schema
    for part in path.split("."):
        props = node.get("properties", {})
        if part not in props:
            return False
        node = props[part]
    return bool(node.get("type") or node.get("anyOf"))


def check_schema_strict(node: dict, path: str = "") -> None:
    """Every object with named properties refuses others (additionalProperties: false)."""
    if node.get("type") == "object" and "properties" in node:
        check(node.get("additionalProperties") is False, f"schema {path or '/'}: additionalProperties")
    for k, sub in node.get("properties", {}).items():
        check_schema_strict(sub, f"{path}/{k}")
    if isinstance(node.get("items"), dict):
        check_schema_strict(node["items"], f"{path}/items")


def case_docs() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.-]+)` \|", readme, re.M))
    leaves = values_leaves(values)
    missing_doc = [leaf for leaf in leaves if leaf not in documented]
    missing_schema = [leaf for leaf in leaves if not schema_has(schema, leaf)]
    check(not missing_doc, f"values not in charts/weft/README.md's table: {missing_doc}")
    check(not missing_schema, f"values not in values.schema.json: {missing_schema}")
    stale = sorted(documented - set(leaves))
    check(not stale, f"README.md documents values that do not exist: {stale}")
    check_schema_strict(schema)
    with helm.Chart.load(str(CHART)) as c:
        c.validate_schema(values)  # the defaults satisfy the schema
    return f"{len(leaves)} leaves documented and in the schema; every object strict"


def help_flags(bin_dir: Path) -> set[str]:
    exe = bin_dir / "weft-control"
    check(exe.exists(), f"{exe} not found (cargo build --bins)")
    out = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=30)
    check(out.returncode == 0, f"weft-control serve --help: exit {out.returncode}")
    flags = set(re.findall(r"^\s+(?:-[A-Za-z], )?(--[a-z0-9][a-z0-9-]*)", out.stdout, re.M))
    check(len(flags) > 20, f"could not parse weft-control serve --help: {flags}")
    return flags


def case_flags(bin_dir: Path, sets: list[tuple[str, dict]]) -> str:
    """Renders every values set itself (a set that fails to render fails this case too), so it
    never passes on fewer renders than there are sets."""
    flags = help_flags(bin_dir)
    check(sets, "no values sets to render")
    used: set[str] = set()
    for name, values in sets:
        r = render(values)
        args = r.args()
        check(args[0] == "serve", f"{name}: first argument {args[0]!r} is not the subcommand serve")
        for a in args[1:]:
            check(a.startswith("--"), f"{name}: argument {a!r} is not a --flag[=value]")
            flag = a.split("=", 1)[0]
            check(flag in flags, f"{name}: weft-control has no flag {flag} "
                  f"(`weft-control serve --help` lists {len(flags)} flags)")
            used.add(flag)
    return f"{len(used)} distinct flags over {len(sets)} renders, all in weft-control serve --help"


def case_kept(tmp: Path) -> str:
    """Generated Secrets are reused when the cluster has them, generated when it has not."""
    parent = tmp / "parent"
    (parent / "templates").mkdir(parents=True)
    (parent / "charts").mkdir()
    shutil.copytree(CHART, parent / "charts" / "weft")
    (parent / "Chart.yaml").write_text("apiVersion: v2\nname: kept-test\nversion: 0.0.0\n")

    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    # A webhook certificate from an earlier install, as the cluster would return it.
    first = render({})
    old_tls = {k: base64.b64encode(v).decode() for k, v in first.secret_data("weft-webhook-tls").items()}
    fake = {
        "ca": {"data": {"tls.crt": b64("old root"), "tls.key": b64("old root key")}},
        "join": {"data": {"token.key": b64("old-token-key\n")}},
        "admin": {"data": {"tokens": b64("admin write a\n"), "admin-token": b64("a"),
                           "metrics-token": b64("m")}},
        "webhook": {"data": old_tls},
        # Incomplete Secrets (a key was deleted): regenerated, never half-reused.
        "caPartial": {"data": {"tls.crt": b64("old root")}},
        "webhookPartial": {"data": {"tls.crt": old_tls["tls.crt"]}},
    }
    template = """{{- $ctx := dict "Values" .Values.weft "Release" .Release
      "Chart" (dict "Name" "weft" "Version" "0.1.0" "AppVersion" "0.1.0") }}
{{- $f := .Values.fake }}
{{ include "weft.caSecret" (dict "ctx" $ctx "existing" $f.ca) }}
---
{{ include "weft.joinKeySecret" (dict "ctx" $ctx "existing" $f.join) }}
---
{{ include "weft.adminSecret" (dict "ctx" $ctx "existing" $f.admin) }}
---
{{ include "weft.webhook" (dict "ctx" $ctx "existing" $f.webhook) }}
---
{{ include "weft.caSecret" (dict "ctx" $ctx "existing" $f.caPartial) | replace "name: weft-ca" "name: partial-ca" }}
---
{{ include "weft.webhook" (dict "ctx" $ctx "existing" $f.webhookPartial) | replace "name: weft-webhook-tls" "name: partial-webhook" | replace "name: weft-system-weft-inject" "name: partial-inject" }}
"""
    (parent / "templates" / "kept.yaml").write_text(template)
    with helm.Chart.load(str(parent)) as c:
        files = c.render({"fake": fake}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    out = Rendered({k: v for k, v in files.items() if k.endswith("kept.yaml")})

    def data(name: str) -> dict[str, str]:
        return out.get("Secret", name)["data"]

    check(data("weft-ca") == fake["ca"]["data"], "upgrade: the CA root was regenerated")
    check(data("weft-join-key") == fake["join"]["data"], "upgrade: token.key was regenerated")
    check(data("weft-admin-tokens") == fake["admin"]["data"], "upgrade: admin tokens regenerated")
    check(data("weft-webhook-tls") == old_tls, "upgrade: the webhook certificate was regenerated")
    hooks = out.get("MutatingWebhookConfiguration", "weft-system-weft-inject")["webhooks"]
    check(hooks[0]["clientConfig"]["caBundle"] == old_tls["ca.crt"],
          "upgrade: caBundle is not the kept certificate's CA")
    partial = data("partial-ca")
    check(partial["tls.crt"] != fake["caPartial"]["data"]["tls.crt"] and "tls.key" in partial,
          "an incomplete CA Secret was half-reused")
    pw = data("partial-webhook")
    pbundle = out.get("MutatingWebhookConfiguration", "partial-inject")["webhooks"][0]
    check(pw["tls.crt"] != old_tls["tls.crt"] and pbundle["clientConfig"]["caBundle"] == pw["ca.crt"],
          "an incomplete webhook Secret was half-reused, or the caBundle does not match it")
    # Without a cluster (helm template), every render generates anew: lookup is what keeps them.
    second = render({})
    check(second.secret_data("weft-ca") != first.secret_data("weft-ca"),
          "two renders without a cluster gave the same root: not generated")
    return "CA, token.key, admin tokens, webhook cert + caBundle reused; incomplete ones regenerated"


# ---------------------------------------------------------------------------------------------
# run:* — the real weft-control with the rendered pod spec


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now, never handed out before by this run, and below the
    kernel's ephemeral range: a port taken from that range (bind to port 0) can be given, between
    this check and the listener's bind, to an outgoing connection (a replica's to etcd), and the
    listener then fails with "address in use" (a CI run lost run:ha that way)."""
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    first = max(1024, low - 12000)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(1000):
        port = rng.randrange(first, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise CaseFailed(f"no free loopback port in {first}..{low}")


class LoopbackHTTPS(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port, with SNI and certificate verification for `host`: how a client
    that resolved the Service name would see the server."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext):
        super().__init__(host, port, context=context, timeout=5)
        self.tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


class Pod:
    """One replica of the rendered Deployment, run as a local process: the volumes written the
    way the kubelet writes them (Secret/ConfigMap contents behind a `..data` symlink to a
    timestamped directory, subPath files, emptyDirs), paths under `root`, listeners on
    loopback."""

    def __init__(self, r: Rendered, extra: dict[tuple[str, str], dict[str, bytes]], root: Path,
                 bin_dir: Path, pod_name: str):
        self.r, self.root, self.pod_name, self.extra = r, root, pod_name, extra
        self.bin_dir = bin_dir
        self.ports = {15010: free_port(), 15011: free_port(), 15017: free_port()}
        c = r.container()
        spec = r.get("Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        self.mounts = sorted(c["volumeMounts"], key=lambda m: m["mountPath"])
        for m in self.mounts:
            self.materialize(volumes[m["name"]], m, extra)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        env["POD_NAME"], env["POD_NAMESPACE"] = pod_name, NAMESPACE
        self.env = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
        self.args = [self.rewrite(a, env) for a in c["args"]]
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        self.log = open(root / "weft-control.log", "wb")
        self.proc = subprocess.Popen([str(bin_dir / "weft-control"), *self.args], cwd=self.cwd,
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def rewrite(self, arg: str, env: dict[str, Any]) -> str:
        arg = re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1), m.group(0))), arg)
        if "=" not in arg:
            return arg
        flag, value = arg.split("=", 1)
        m = re.fullmatch(r"0\.0\.0\.0:(\d+)", value)
        if m:
            return f"{flag}=127.0.0.1:{self.ports[int(m.group(1))]}"
        if any(value == mt["mountPath"] or value.startswith(mt["mountPath"].rstrip("/") + "/")
               for mt in self.mounts):
            return f"{flag}={self.host(value)}"
        return arg

    def contents(self, vol: dict, extra: dict) -> tuple[dict[str, bytes], int]:
        if "secret" in vol:
            name, kind, mode = vol["secret"]["secretName"], "Secret", vol["secret"].get("defaultMode", 0o644)
            data = (self.r.secret_data(name) if self.r.has("Secret", name) else extra[(kind, name)])
        else:
            name, kind, mode = vol["configMap"]["name"], "ConfigMap", vol["configMap"].get("defaultMode", 0o644)
            data = ({k: v.encode() for k, v in (self.r.get("ConfigMap", name).get("data") or {}).items()}
                    if self.r.has("ConfigMap", name) else extra[(kind, name)])
        items = vol.get("secret", vol.get("configMap")).get("items")
        if items:
            data = {it["path"]: data[it["key"]] for it in items}
        return data, mode

    def materialize(self, vol: dict, mount: dict, extra: dict) -> None:
        target = self.host(mount["mountPath"])
        if "emptyDir" in vol:
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o777)  # what the kubelet creates
            return
        data, mode = self.contents(vol, extra)
        if "subPath" in mount:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[mount["subPath"]])
            target.chmod(mode)
            return
        # The kubelet's atomic writer: ..<timestamp>/files, ..data -> ..<timestamp>, name -> ..data/name.
        target.mkdir(parents=True, exist_ok=True)
        stamp = target / "..2026_12_01_00_00_00.000000001"
        stamp.mkdir()
        for k, v in data.items():
            (stamp / k).write_bytes(v)
            (stamp / k).chmod(mode)
        os.symlink(stamp.name, target / "..data")
        for k in data:
            os.symlink(f"..data/{k}", target / k)

    def tls(self, cafile: Path, port: int, path: str, token: str | None = None,
            server_name: str = "weft-control.weft-system.svc") -> tuple[int, str]:
        """GET https://<server_name>:<port><path> on loopback, verifying the certificate for
        server_name against cafile."""
        conn = LoopbackHTTPS(server_name, port, ssl.create_default_context(cafile=str(cafile)))
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def post(self, cafile: Path, port: int, path: str, body: dict, server_name: str) -> tuple[int, str]:
        conn = LoopbackHTTPS(server_name, port, ssl.create_default_context(cafile=str(cafile)))
        try:
            conn.request("POST", path, body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def wait_ready(self, cafile: Path) -> None:
        deadline = time.monotonic() + WAIT
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CaseFailed(f"weft-control exited with {self.proc.returncode}: {self.output()}")
            try:
                status, body = self.tls(cafile, self.ports[15011], "/readyz")
                if status == 200:
                    return
                last = f"/readyz {status}: {body.strip()[:200]}"
            except (OSError, ssl.SSLError) as e:
                last = str(e)
            time.sleep(0.2)
        raise CaseFailed(f"weft-control not ready within {WAIT}s (last: {last}): {self.output()}")

    def output(self) -> str:
        """The log's last 1,500 characters without backtrace frames (with RUST_BACKTRACE set, an
        error's frames would push its message out of the excerpt)."""
        self.log.flush()
        text = (self.root / "weft-control.log").read_text(errors="replace")
        frame = re.compile(r"^\s+(\d+: |at )")
        return "\n".join(l for l in text.splitlines() if not frame.match(l))[-1500:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def check_pod(pod: Pod, r: Rendered, tmp: Path) -> list[str]:
    """What the kubelet, injected proxies, Prometheus, weftctl and the API server will see."""
    done = []
    volumes = r.get("Deployment")["spec"]["template"]["spec"]["volumes"]
    ca_secret = [v for v in volumes if v["name"] == "ca-root"][0]["secret"]["secretName"]
    root = tmp / f"root-{pod.pod_name}.pem"
    root.write_bytes(pod.contents({"secret": {"secretName": ca_secret}}, pod.extra)[0]["tls.crt"])
    pod.wait_ready(root)
    done.append("/readyz 200")
    status, _ = pod.tls(root, pod.ports[15011], "/healthz")
    check(status == 200, f"/healthz answered {status}")
    # Every name the chart dials the control plane by is in its certificate, under the chart's CA.
    for name in SERVICE_DNS:
        for port in (15010, 15011):
            ctx = ssl.create_default_context(cafile=str(root))
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(("127.0.0.1", pod.ports[port]), timeout=5) as s:
                with ctx.wrap_socket(s, server_hostname=name):
                    pass
    done.append(f"gRPC and admin certificates verify for {len(SERVICE_DNS)} Service names")
    admin = pod.admin_tokens
    status, body = pod.tls(root, pod.ports[15011], "/metrics", admin["metrics-token"])
    check(status == 200 and "weft_control_" in body, f"/metrics with the metrics token: {status}")
    status, _ = pod.tls(root, pod.ports[15011], "/v1/policies", admin["admin-token"])
    check(status == 200, f"/v1/policies with the admin token: {status}")
    status, _ = pod.tls(root, pod.ports[15011], "/v1/policies")
    check(status == 401, f"/v1/policies without a token: {status} (expected 401)")
    done.append("metrics (read) and admin (write) tokens accepted, no token refused")
    if r.arg("--inject-addr"):
        hook = r.get("MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]
        bundle = tmp / f"cabundle-{pod.pod_name}.pem"
        bundle.write_bytes(base64.b64decode(hook["caBundle"]))
        server = f"{hook['service']['name']}.{hook['service']['namespace']}.svc"
        status, _ = pod.tls(bundle, pod.ports[15017], "/healthz", server_name=server)
        check(status == 200, f"webhook /healthz answered {status}")
        done.append(f"webhook serves {server} verified by the caBundle")
        done.append(webhook_injects(pod, r, bundle, server))
    done.append(proxy_joins(pod, r, tmp))
    check(not any(pod.cwd.iterdir()), f"weft-control wrote outside its volumes: {list(pod.cwd.iterdir())}")
    return done


def webhook_injects(pod: Pod, r: Rendered, bundle: Path, server: str) -> str:
    """The API server's call, as the MutatingWebhookConfiguration makes it: the chart's
    inject.yaml reaches the pod (its proxy image and control-plane address)."""
    pod_spec = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
                "spec": {"serviceAccountName": "web",
                         "containers": [{"name": "web", "image": "web:1",
                                         "ports": [{"containerPort": 8080}]}]}}
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "0f5c7d1e-chart-test", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "web-1", "namespace": "shop", "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod_spec, "oldObject": None, "dryRun": False}}
    hook = r.get("MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["service"]
    status, body = pod.post(bundle, pod.ports[15017], hook["path"], review, server)
    check(status == 200, f"POST {hook['path']}: {status}: {body[:300]}")
    resp = json.loads(body)["response"]
    check(resp["uid"] == review["request"]["uid"] and resp["allowed"] is True,
          f"AdmissionReview response {json.dumps(resp)[:300]}")
    check(resp.get("patchType") == "JSONPatch", f"no JSONPatch: {json.dumps(resp)[:300]}")
    patch = base64.b64decode(resp["patch"]).decode()
    conf = yaml.safe_load(r.get("ConfigMap", "weft-inject")["data"]["inject.yaml"])
    for want in (conf["proxy"]["image"], conf["controlPlane"]["address"]):
        check(want in patch, f"the patch does not carry {want} from inject.yaml")
    return "POST /inject: the patch carries inject.yaml's proxy image and control-plane address"


def proxy_joins(pod: Pod, r: Rendered, tmp: Path) -> str:
    """A real weft-proxy gets its certificate and config from this control plane: it trusts the
    CA the chart set up (roots.pem the control plane wrote, rustls verifying the chain to the
    chart's root) and authenticates with a join token derived from the chart's token.key."""
    ca_dir = pod.host(r.arg("--ca-dir")[0])
    out = subprocess.run([str(pod.bin_dir / "weft-control"), "token", "--ca-dir", str(ca_dir),
                          "--service", "web", "--namespace", "default"],
                         capture_output=True, text=True, timeout=30)
    check(out.returncode == 0, f"weft-control token: {out.stderr[-300:]}")
    d = pod.root / "proxy"
    d.mkdir()
    (d / "token").write_text(out.stdout.strip() + "\n")
    admin, app = free_port(), free_port()
    (d / "bootstrap.yaml").write_text(yaml.safe_dump({
        "node": {"service": "web", "namespace": "default", "id": f"web-{pod.pod_name}"},
        "admin": f"127.0.0.1:{admin}",
        "control_plane": f"https://127.0.0.1:{pod.ports[15010]}",
        "control_plane_ca": str(ca_dir / "roots.pem"),
        "join_token_file": str(d / "token"),
        "inbound": {"address": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"},
        "outbound": {"address": f"127.0.0.1:{free_port()}", "tcp_bind_ip": "127.0.0.1"},
    }))
    log = open(d / "proxy.log", "wb")
    proc = subprocess.Popen([str(pod.bin_dir / "weft-proxy"), "--config", str(d / "bootstrap.yaml")],
                            cwd=d, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, last = time.monotonic() + WAIT, "no answer"
        while time.monotonic() < deadline:
            check(proc.poll() is None, f"weft-proxy exited: {(d / 'proxy.log').read_text()[-800:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return "a weft-proxy joined (certificate from the chart's CA, token from its token.key): /ready 200"
            except urllib.error.HTTPError as e:
                last = f"/ready {e.code}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise CaseFailed(f"weft-proxy not ready within {WAIT}s ({last}): {(d / 'proxy.log').read_text()[-800:]}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def start_pod(r: Rendered, extra: dict, tmp: Path, bin_dir: Path, name: str) -> Pod:
    root = tmp / name
    root.mkdir()
    pod = Pod(r, extra, root, bin_dir, name)
    admin_secret = [v for v in r.get("Deployment")["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == "admin-tokens"][0]["secret"]["secretName"]
    tokens = (r.secret_data(admin_secret) if r.has("Secret", admin_secret)
              else extra[("Secret", admin_secret)])
    pod.admin_tokens = {k: v.decode().strip() for k, v in tokens.items()}
    return pod


def case_run(r: Rendered, extra: dict, tmp: Path, bin_dir: Path) -> str:
    pod = start_pod(r, extra, tmp, bin_dir, "weft-control-0")
    try:
        done = check_pod(pod, r, tmp)
        # The policy directory the ConfigMap makes is the one being served.
        files = (r.get("ConfigMap", "weft-policies").get("data") or {}) if r.has("ConfigMap", "weft-policies") else {}
        status, body = pod.tls(tmp / "root-weft-control-0.pem", pod.ports[15011], "/v1/policies",
                               pod.admin_tokens["admin-token"])
        for f in files:
            check(f in body, f"policy file {f} not served: {body[:300]}")
        if files:
            done.append(f"{len(files)} policy files served from the ConfigMap volume")
        return "; ".join(done)
    finally:
        pod.stop()


def case_run_ha(tmp: Path, bin_dir: Path) -> str:
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    check(Path(etcd).exists(), "etcd not found (Debian etcd-server: scripts/install-test-deps.sh)")
    client, peer = free_port(), free_port()
    data = tmp / "etcd"
    log = open(tmp / "etcd.log", "wb")
    proc = subprocess.Popen([etcd, "--name", "n1", "--data-dir", str(data),
                             "--listen-client-urls", f"http://127.0.0.1:{client}",
                             "--advertise-client-urls", f"http://127.0.0.1:{client}",
                             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-cluster", f"n1=http://127.0.0.1:{peer}"],
                            stdout=log, stderr=subprocess.STDOUT)
    pods: list[Pod] = []
    try:
        values = {"replicas": 2, "store": {"type": "etcd", "etcd": {
            "endpoints": [f"http://127.0.0.1:{client}"], "prefix": "/weft-chart-test"}}}
        r = render(values)
        done = []
        for i in range(2):
            pods.append(start_pod(r, {}, tmp, bin_dir, f"weft-control-{i}"))
        for pod in pods:
            done = check_pod(pod, r, tmp)
        for pod in pods:
            check(pod.proc.poll() is None, f"{pod.pod_name} exited: {pod.output()}")
        return "2 replicas share the chart's CA Secret and token.key on a real etcd; " + "; ".join(done)
    finally:
        for pod in pods:
            pod.stop()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def byo_extra(values: dict, tmp: Path) -> dict:
    """The Secrets a user of byo_values creates before installing."""
    crt, key = test_root(tmp / "byo")
    admin, metrics = "byo-admin-token-0123456789", "byo-metrics-token-0123456789"
    # The webhook certificate, signed by the root given as caBundle (the same test root here).
    wdir = tmp / "byo-webhook"
    wdir.mkdir()
    (wdir / "ca.pem").write_bytes(crt)
    (wdir / "ca-key.pem").write_bytes(key)
    (wdir / "ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in SERVICE_DNS) + "\n")
    openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(wdir / "k.pem"), "-out", str(wdir / "csr"), "-subj", "/CN=weft-webhook"])
    openssl(["x509", "-req", "-in", str(wdir / "csr"), "-CA", str(wdir / "ca.pem"),
             "-CAkey", str(wdir / "ca-key.pem"), "-CAcreateserial", "-days", "30",
             "-extfile", str(wdir / "ext"), "-out", str(wdir / "c.pem")])
    values["webhook"]["tls"]["caBundle"] = crt.decode()
    return {
        ("Secret", "my-root"): {"tls.crt": crt, "tls.key": key},
        ("Secret", "my-admin-tokens"): {
            "tokens": f"admin write {admin}\nmetrics read {metrics}\n".encode(),
            "admin-token": admin.encode(), "metrics-token": metrics.encode()},
        ("Secret", "my-webhook-tls"): {"tls.crt": (wdir / "c.pem").read_bytes(),
                                       "tls.key": (wdir / "k.pem").read_bytes(), "ca.crt": crt},
    }


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", type=Path, default=REPO / "target" / "debug")
    ap.add_argument("--only", action="append", default=[])
    opts = ap.parse_args()
    opts.bin_dir = opts.bin_dir.resolve()  # the processes run in directories of their own
    passed = failed = 0

    def run(name: str, fn: Callable[[], str]) -> None:
        nonlocal passed, failed
        if opts.only and not any(name.startswith(p) for p in opts.only):
            return
        try:
            detail = fn()
            print(f"ok: {name}: {detail}", flush=True)
            passed += 1
        except CaseFailed as e:
            print(f"FAILED: {name}: {e}", flush=True)
            failed += 1
        except Exception as e:  # a bug in a case or the chart failing to render: a failure
            print(f"FAILED: {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stdout)
            failed += 1

    with tempfile.TemporaryDirectory(prefix="weft-chart-") as t:
        tmp = Path(t)
        (tmp / "fixtures").mkdir()
        cases = render_cases(tmp / "fixtures")
        for name, values, specific in cases:
            def one(name=name, values=values, specific=specific) -> str:
                d = tmp / f"render-{name}"
                d.mkdir()
                r = render(values)
                check_common(r, values)
                if values.get("injection", {}).get("enabled", True):
                    check(r.all("MutatingWebhookConfiguration"), "injection on: no webhook")
                what = specific(r, values, d)
                return f"{what}; kubernetes-validate --strict: {kubernetes_validate(r, d)}"
            run(f"render:{name}", one)
        run("lint", lambda: case_lint([(n, v) for n, v, _ in cases]))
        for name, values, needle in BAD_VALUES:
            def bad(values=values, needle=needle) -> str:
                err = render_error(values)
                check(err, "rendered without an error")
                check(needle in err, f"refused, but the message does not say {needle!r}: {err}")
                return f"refused: {err.strip().splitlines()[-1].strip()[:150]}"
            run(f"bad:{name}", bad)
        run("docs", case_docs)
        run("flags", lambda: case_flags(opts.bin_dir, [(n, v) for n, v, _ in cases]))
        run("kept", lambda: case_kept(tmp / "kept"))

        def run_default() -> str:
            d = tmp / "run-default"
            d.mkdir()
            return case_run(render({}), {}, d, opts.bin_dir)

        def run_policies() -> str:
            d = tmp / "run-inline-policies"
            d.mkdir()
            values = {"policies": {"files": example_policies()},
                      "injection": {"tokenVerification": {"jwks": jwks(d / "jwks")}}}
            return case_run(render(values), {}, d, opts.bin_dir)

        def run_byo() -> str:
            d = tmp / "run-byo-ca"
            d.mkdir()
            values = byo_values(d)
            extra = byo_extra(values, d)
            return case_run(render(values), extra, d, opts.bin_dir)

        def run_ha() -> str:
            d = tmp / "run-ha"
            d.mkdir()
            return case_run_ha(d, opts.bin_dir)

        run("run:default", run_default)
        run("run:inline-policies", run_policies)
        run("run:byo-ca", run_byo)
        run("run:ha", run_ha)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
