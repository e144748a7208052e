{{/*
The Secrets the chart generates once and keeps. Each named template takes
(dict "ctx" <root context> "existing" <lookup result>) and renders the Secret: the existing data
when it is complete (weft.keptData), freshly generated otherwise. They are named templates so
the chart's tests can render them with a stand-in for the cluster's answer (charts/test/).
Every one carries helm.sh/resource-policy: keep, so `helm uninstall` leaves the keys behind and a
re-install with the same release name adopts them.
*/}}

{{/* A random 32-byte secret, base64url without padding (the format of weft's token.key). */}}
{{- define "weft.randomKey" -}}
{{- randBytes 32 | replace "+" "-" | replace "/" "_" | trimSuffix "=" -}}
{{- end }}

{{- define "weft.keptMetadata" -}}
namespace: {{ .Release.Namespace }}
labels:
  {{- include "weft.labels" . | nindent 2 }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}

{{/*
The generated mesh root (ca.existingSecret empty): an Ed25519 key, because Helm's genPrivateKey
writes Ed25519 keys as PKCS#8 ("BEGIN PRIVATE KEY"), the format weft-control's --root-key reads
(ECDSA and RSA keys come out as SEC1/PKCS#1). The root signs only the intermediate that
weft-control generates at start (ECDSA P-256); proxies verify Ed25519 with every rustls provider.
*/}}
{{- define "weft.caSecret" -}}
{{- $ := .ctx -}}
{{- $data := include "weft.keptData" (dict "existing" .existing "keys" (list "tls.crt" "tls.key")) | fromYaml -}}
{{- if not $data -}}
{{- $key := genPrivateKey "ed25519" -}}
{{- $root := genCAWithKey (printf "weft root CA (%s)" $.Values.trustDomain) (int $.Values.ca.generatedValidityDays) $key -}}
{{- $data = dict "tls.crt" ($root.Cert | b64enc) "tls.key" ($root.Key | b64enc) -}}
{{- end -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ printf "%s-ca" $.Release.Name }}
  {{- include "weft.keptMetadata" $ | nindent 2 }}
type: kubernetes.io/tls
data:
  tls.crt: {{ get $data "tls.crt" }}
  tls.key: {{ get $data "tls.key" }}
{{- end }}

{{/* token.key: the join-token secret every replica shares (weft-control's <ca-dir>/token.key). */}}
{{- define "weft.joinKeySecret" -}}
{{- $ := .ctx -}}
{{- $data := include "weft.keptData" (dict "existing" .existing "keys" (list "token.key")) | fromYaml -}}
{{- if not $data -}}
{{- $data = dict "token.key" (printf "%s\n" (include "weft.randomKey" $) | b64enc) -}}
{{- end -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "weft.joinKeySecretName" $ }}
  {{- include "weft.keptMetadata" $ | nindent 2 }}
type: Opaque
data:
  token.key: {{ get $data "token.key" }}
{{- end }}

{{/*
Admin API bearer tokens (admin.existingSecret empty): `tokens` is weft-control's --admin-tokens
file; `admin-token` (role write) is for operators' weftctl, `metrics-token` (role read) for the
ServiceMonitor. The control plane's per-pod bootstrap token is off (--no-admin-bootstrap-token):
replicas would each write their own.
*/}}
{{- define "weft.adminSecret" -}}
{{- $ := .ctx -}}
{{- $data := include "weft.keptData" (dict "existing" .existing "keys" (list "tokens" "admin-token" "metrics-token")) | fromYaml -}}
{{- if not $data -}}
{{- $admin := include "weft.randomKey" $ -}}
{{- $metrics := include "weft.randomKey" $ -}}
{{- $tokens := printf "admin write %s\nmetrics read %s\n" $admin $metrics -}}
{{- $data = dict "tokens" ($tokens | b64enc) "admin-token" ($admin | b64enc) "metrics-token" ($metrics | b64enc) -}}
{{- end -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ printf "%s-admin-tokens" $.Release.Name }}
  {{- include "weft.keptMetadata" $ | nindent 2 }}
type: Opaque
data:
  tokens: {{ get $data "tokens" }}
  admin-token: {{ get $data "admin-token" }}
  metrics-token: {{ get $data "metrics-token" }}
{{- end }}

{{/*
The webhook's serving certificate (webhook.tls.mode=generate) and the MutatingWebhookConfiguration
in one template, so the caBundle is the CA of exactly that certificate: a CA (ECDSA P-256) and a
certificate for the Service's DNS names, generated once and kept like the others.
*/}}
{{- define "weft.webhookTLSSecret" -}}
{{- $ := .ctx -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "weft.webhookSecretName" $ }}
  {{- include "weft.keptMetadata" $ | nindent 2 }}
type: kubernetes.io/tls
data:
  tls.crt: {{ get .data "tls.crt" }}
  tls.key: {{ get .data "tls.key" }}
  ca.crt: {{ get .data "ca.crt" }}
{{- end }}

{{- define "weft.webhookTLSData" -}}
{{- $ := .ctx -}}
{{- $data := include "weft.keptData" (dict "existing" .existing "keys" (list "tls.crt" "tls.key" "ca.crt")) | fromYaml -}}
{{- if not $data -}}
{{- $days := int $.Values.webhook.tls.generatedValidityDays -}}
{{- $ca := genCAWithKey (printf "weft webhook CA (%s/%s)" $.Release.Namespace $.Release.Name) $days (genPrivateKey "ecdsa") -}}
{{- $names := include "weft.serviceDNSNames" $ | fromJsonArray -}}
{{- $cert := genSignedCertWithKey (index $names 2) nil $names $days $ca (genPrivateKey "ecdsa") -}}
{{- $data = dict "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) "ca.crt" ($ca.Cert | b64enc) -}}
{{- end -}}
{{- $data | toYaml -}}
{{- end }}
