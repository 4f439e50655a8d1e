{{/* Labels every object carries. */}}
{{- define "wgmesh.labels" -}}
app.kubernetes.io/name: wgmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "wgmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Whether the controller runs on the host network: CNI mode needs it, since pod
networking only exists once agents have reached the controller. */}}
{{- define "wgmesh.controllerHostNetwork" -}}
{{- if kindIs "bool" .Values.controller.hostNetwork -}}
{{ .Values.controller.hostNetwork }}
{{- else -}}
true
{{- end -}}
{{- end }}

{{/* The name agents check in the controller's certificate. */}}
{{- define "wgmesh.serverName" -}}
wgmesh-controller.{{ .Release.Namespace }}.svc
{{- end }}

{{- define "wgmesh.tlsSecret" -}}
{{ .Values.tls.existingSecret | default "wgmesh-controller-tls" }}
{{- end }}

{{/* The ConfigMap agents read the CA certificate from (key ca.crt): the chart's own, or
tls.caConfigMap with tls.existingSecret. Never the TLS Secret: a kubelet may read every Secret
its node's pods reference, whole, key included. */}}
{{- define "wgmesh.caConfigMap" -}}
{{- if .Values.tls.existingSecret -}}
{{ required "tls.caConfigMap is required with tls.existingSecret: name a ConfigMap in the release namespace with the CA certificate as ca.crt (the agents must not mount the TLS Secret, or every node's kubelet could read its key)" .Values.tls.caConfigMap }}
{{- else if .Values.tls.caConfigMap -}}
{{- fail "tls.caConfigMap is only for tls.existingSecret: without it the chart generates the CA and its own ConfigMap wgmesh-controller-ca" }}
{{- else -}}
wgmesh-controller-ca
{{- end -}}
{{- end }}

{{/* The namespaces the controller reads Secrets in, comma-separated: peerSecrets.namespace
and rbac.secretNamespaces. */}}
{{- define "wgmesh.secretNamespaces" -}}
{{- $namespaces := prepend .Values.rbac.secretNamespaces .Values.peerSecrets.namespace | uniq }}
{{- if has .Release.Namespace $namespaces }}
{{- fail (printf "peerSecrets.namespace and rbac.secretNamespaces must not name the release namespace %s: it holds the controller's TLS key, which a peer's presharedKeySecretRef could then name" .Release.Namespace) }}
{{- end }}
{{- $namespaces | join "," }}
{{- end }}
