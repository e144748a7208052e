{{/*
weft.webhook (dict "ctx" <root context> "existing" <lookup of the webhook TLS Secret>): the
webhook's serving-certificate Secret (mode generate) and the MutatingWebhookConfiguration whose
caBundle verifies it. One template, so the caBundle always belongs to the certificate rendered
next to it.

Selection (README.md, "Injection"): pods created in namespaces labelled weft.io/inject=enabled,
except the release's own namespace and kube-system (so the control plane is never blocked by
its own webhook, whatever failurePolicy says) and injection.excludeNamespaces; a pod labelled
weft.io/inject=false is not even sent. With injection.podOptIn, also pods labelled
weft.io/inject=true in namespaces without the label (a namespace labelled
weft.io/inject=disabled stays out). The webhook itself honours the weft.io/inject: "false"
annotation and leaves injected pods (weft.io/injected) alone.
*/}}
{{- define "weft.webhook" -}}
{{- $ := .ctx -}}
{{- $tls := $.Values.webhook.tls -}}
{{- $caBundle := "" -}}
{{- if eq $tls.mode "generate" -}}
{{- $data := include "weft.webhookTLSData" (dict "ctx" $ "existing" .existing) | fromYaml -}}
{{- $caBundle = get $data "ca.crt" -}}
{{ include "weft.webhookTLSSecret" (dict "ctx" $ "data" $data) }}
---
{{ else if eq $tls.mode "secret" -}}
{{- $caBundle = $tls.caBundle | b64enc -}}
{{- end -}}
{{- $excluded := concat (list $.Release.Namespace "kube-system") $.Values.injection.excludeNamespaces | uniq -}}
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: {{ printf "%s-%s-inject" $.Release.Namespace $.Release.Name | trunc 253 }}
  labels:
    {{- include "weft.labels" $ | nindent 4 }}
  {{- if eq $tls.mode "certManager" }}
  annotations:
    cert-manager.io/inject-ca-from: {{ printf "%s/%s" $.Release.Namespace $tls.certManagerCertificate }}
  {{- end }}
webhooks:
  - name: inject.weft.io
    {{- include "weft.webhookCommon" (dict "ctx" $ "caBundle" $caBundle) | nindent 4 }}
    namespaceSelector:
      matchExpressions:
        - key: weft.io/inject
          operator: In
          values: ["enabled"]
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values: {{ $excluded | toJson }}
    objectSelector:
      matchExpressions:
        - key: weft.io/inject
          operator: NotIn
          values: ["false"]
  {{- if $.Values.injection.podOptIn }}
  - name: pods.inject.weft.io
    {{- include "weft.webhookCommon" (dict "ctx" $ "caBundle" $caBundle) | nindent 4 }}
    namespaceSelector:
      matchExpressions:
        - key: weft.io/inject
          operator: NotIn
          values: ["enabled", "disabled"]
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values: {{ $excluded | toJson }}
    objectSelector:
      matchLabels:
        weft.io/inject: "true"
  {{- end }}
{{- end }}

{{- define "weft.webhookCommon" -}}
{{- $ := .ctx -}}
admissionReviewVersions: ["v1"]
sideEffects: None
failurePolicy: {{ $.Values.injection.failurePolicy }}
reinvocationPolicy: IfNeeded
matchPolicy: Equivalent
timeoutSeconds: {{ $.Values.injection.timeoutSeconds }}
clientConfig:
  service:
    name: {{ include "weft.control" $ }}
    namespace: {{ $.Release.Namespace }}
    path: /inject
    port: 15017
  {{- if .caBundle }}
  caBundle: {{ .caBundle }}
  {{- end }}
rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
    scope: Namespaced
{{- end }}
