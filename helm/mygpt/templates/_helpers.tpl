{{/* Names and labels. */}}
{{- define "mygpt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mygpt.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mygpt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mygpt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mygpt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mygpt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mygpt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mygpt.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The container port: settings.port (the server's own default, 8000, when unset). */}}
{{- define "mygpt.port" -}}
{{- get .Values.settings "port" | default 8000 | int }}
{{- end }}

{{/* Mount points the chart owns (the image uses the same ones). */}}
{{- define "mygpt.cacheDir" -}}/var/cache/mygpt{{- end }}
{{- define "mygpt.adapterDir" -}}/data/adapters{{- end }}
{{- define "mygpt.configFile" -}}/etc/mygpt/config/tenancy.yaml{{- end }}
{{- define "mygpt.keysDir" -}}/etc/mygpt/keys{{- end }}

{{/* The keys Secret's name, or "" when the pods get no keys (one open tenant). */}}
{{- define "mygpt.keysSecret" -}}
{{- if .Values.keys.existingSecret }}
{{- .Values.keys.existingSecret }}
{{- else if .Values.keys.generate.enabled }}
{{- printf "%s-keys" (include "mygpt.fullname" .) }}
{{- end }}
{{- end }}

{{/* The tenants the chart generates keys for, as a JSON list. */}}
{{- define "mygpt.generatedTenants" -}}
{{- $configured := keys (get .Values.tenancy.config "tenants" | default dict) | sortAlpha }}
{{- $tenants := .Values.keys.generate.tenants }}
{{- if not $tenants }}
{{- $tenants = $configured | default (list (get .Values.settings "default_tenant" | default "default")) }}
{{- end }}
{{- if .Values.tenancy.config }}
{{- range $tenants }}
{{- if not (has . $configured) }}
{{- fail (printf "keys.generate.tenants: %q is not a tenant of tenancy.config (the server refuses a key file for an unknown tenant)" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $tenants }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the drain (settings.shutdown_timeout_s), then 5 s
for the process to exit. An explicit value below preStop + drain fails the render.
*/}}
{{- define "mygpt.gracePeriod" -}}
{{- $drain := get .Values.settings "shutdown_timeout_s" | default 30 | ceil | int }}
{{- $need := add .Values.shutdown.preStopSleepSeconds $drain }}
{{- $set := .Values.shutdown.terminationGracePeriodSeconds | int }}
{{- if not $set }}
{{- add $need 5 }}
{{- else if lt $set (int $need) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds=%d is shorter than preStopSleepSeconds + settings.shutdown_timeout_s = %d: the kubelet would kill streams mid-drain" $set (int $need)) }}
{{- else }}
{{- $set }}
{{- end }}
{{- end }}

{{/* An env value as a string; whole numbers print without an exponent (YAML numbers arrive as floats). */}}
{{- define "mygpt.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* A PVC-or-emptyDir volume source for persistence.<name>. */}}
{{- define "mygpt.volumeSource" -}}
{{- $p := index .root.Values.persistence .name }}
{{- if $p.existingClaim }}
persistentVolumeClaim:
  claimName: {{ $p.existingClaim }}
{{- else if $p.enabled }}
persistentVolumeClaim:
  claimName: {{ printf "%s-%s" (include "mygpt.fullname" .root) .name }}
{{- else }}
emptyDir:
  sizeLimit: {{ $p.emptyDirSizeLimit }}
{{- end }}
{{- end }}
