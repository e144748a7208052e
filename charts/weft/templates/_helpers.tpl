{{/*
Names. The fixed interface with weft-control's injection webhook: the Service is
<release>-control (gRPC 15010, admin 15011, webhook 15017), the inject ConfigMap <release>-inject.
*/}}
{{- define "weft.control" -}}
{{- printf "%s-control" .Release.Name -}}
{{- end }}

{{- define "weft.serviceAccountName" -}}
{{- default (include "weft.control" .) .Values.serviceAccount.name -}}
{{- end }}

{{/* The Service's DNS names, shortest first: what the server certificates must name. */}}
{{- define "weft.serviceDNSNames" -}}
{{- $svc := include "weft.control" . -}}
{{- list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.%s" $svc .Release.Namespace .Values.clusterDomain) | toJson -}}
{{- end }}

{{- define "weft.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end }}

{{- define "weft.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weft
{{- end }}

{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/* Secret names: the user's, or the one the chart generates. */}}
{{- define "weft.caSecretName" -}}
{{- default (printf "%s-ca" .Release.Name) .Values.ca.existingSecret -}}
{{- end }}

{{- define "weft.joinKeySecretName" -}}
{{- printf "%s-join-key" .Release.Name -}}
{{- end }}

{{- define "weft.adminSecretName" -}}
{{- default (printf "%s-admin-tokens" .Release.Name) .Values.admin.existingSecret -}}
{{- end }}

{{- define "weft.webhookSecretName" -}}
{{- if eq .Values.webhook.tls.mode "generate" -}}
{{- printf "%s-webhook-tls" .Release.Name -}}
{{- else -}}
{{- .Values.webhook.tls.existingSecret -}}
{{- end -}}
{{- end }}

{{- define "weft.jwksConfigMapName" -}}
{{- default (printf "%s-k8s-jwks" .Release.Name) .Values.injection.tokenVerification.jwksConfigMap -}}
{{- end }}

{{/* Whether the control plane verifies projected ServiceAccount tokens (keys given). */}}
{{- define "weft.verifiesTokens" -}}
{{- $t := .Values.injection.tokenVerification -}}
{{- if and .Values.injection.enabled (or $t.jwks $t.jwksConfigMap) }}true{{ end -}}
{{- end }}

{{- define "weft.policiesConfigMapName" -}}
{{- default (printf "%s-policies" .Release.Name) .Values.policies.existingConfigMap -}}
{{- end }}

{{/*
weft.keptData: the data of an existing Secret (the `lookup` result passed as .existing) when it
holds every key in .keys, as YAML; "" otherwise. This is how generated keys and certificates
survive `helm upgrade`: generated once, then read back from the cluster and re-rendered as they
are. (`helm template` and client-side dry runs have no cluster: lookup is empty there and
every render generates new ones; see README.md, "The CA".)
*/}}
{{- define "weft.keptData" -}}
{{- $data := dig "data" dict (default dict .existing) -}}
{{- $complete := true -}}
{{- range .keys -}}
{{- if not (get $data .) -}}{{- $complete = false -}}{{- end -}}
{{- end -}}
{{- if $complete -}}
{{- $data | toYaml -}}
{{- end -}}
{{- end }}

{{/*
weft.validate: the rules between values that the schema cannot say clearly. Included by the
Deployment, so every render checks them.
*/}}
{{- define "weft.validate" -}}
{{- $v := .Values -}}
{{- if and (gt (int $v.replicas) 1) (eq $v.store.type "files") -}}
{{- fail (printf "replicas=%d needs store.type=etcd: the file store (the policy ConfigMap and registry.json on the pod's own disk) serves one replica only. Set store.type=etcd and store.etcd.endpoints, or replicas=1" (int $v.replicas)) -}}
{{- end -}}
{{- if and (eq $v.store.type "etcd") (not $v.store.etcd.endpoints) -}}
{{- fail "store.type=etcd needs store.etcd.endpoints (e.g. [http://etcd.db.svc:2379])" -}}
{{- end -}}
{{- if and (eq $v.store.type "etcd") (or $v.policies.files $v.policies.existingConfigMap) -}}
{{- fail "with store.type=etcd the policies live in etcd (apply them with `weftctl apply`): leave policies.files and policies.existingConfigMap empty" -}}
{{- end -}}
{{- if and $v.policies.files $v.policies.existingConfigMap -}}
{{- fail "policies.files and policies.existingConfigMap are exclusive: put the files in the ConfigMap, or leave existingConfigMap empty" -}}
{{- end -}}
{{- if and $v.injection.tokenVerification.jwks $v.injection.tokenVerification.jwksConfigMap -}}
{{- fail "injection.tokenVerification.jwks and jwksConfigMap are exclusive: give the keys inline or name the ConfigMap holding them" -}}
{{- end -}}
{{- if $v.injection.tokenVerification.jwks -}}
{{- $keys := $v.injection.tokenVerification.jwks | fromJson -}}
{{- if or (hasKey $keys "Error") (not (kindIs "slice" (get $keys "keys"))) -}}
{{- fail "injection.tokenVerification.jwks is not a JWKS (JSON with a \"keys\" array): use the output of `kubectl get --raw /openid/v1/jwks`" -}}
{{- end -}}
{{- end -}}
{{- if and $v.store.etcd.clientCert (not $v.store.etcd.tlsSecret) -}}
{{- fail "store.etcd.clientCert needs store.etcd.tlsSecret (a Secret with ca.crt, tls.crt and tls.key)" -}}
{{- end -}}
{{- if and $v.store.etcd.user (not $v.store.etcd.passwordSecret) -}}
{{- fail "store.etcd.user needs store.etcd.passwordSecret (a Secret with key password)" -}}
{{- end -}}
{{- if and $v.injection.enabled (eq $v.webhook.tls.mode "secret") (or (not $v.webhook.tls.existingSecret) (not $v.webhook.tls.caBundle)) -}}
{{- fail "webhook.tls.mode=secret needs webhook.tls.existingSecret (a kubernetes.io/tls Secret) and webhook.tls.caBundle (the PEM of the CA that signed it)" -}}
{{- end -}}
{{- if and $v.injection.enabled (eq $v.webhook.tls.mode "certManager") (or (not $v.webhook.tls.existingSecret) (not $v.webhook.tls.certManagerCertificate)) -}}
{{- fail "webhook.tls.mode=certManager needs webhook.tls.certManagerCertificate (the cert-manager Certificate, in the release namespace) and webhook.tls.existingSecret (its secretName)" -}}
{{- end -}}
{{- end }}
