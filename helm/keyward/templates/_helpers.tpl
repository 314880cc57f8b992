{{/* Names ------------------------------------------------------------------ */}}

{{- define "keyward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Room for the "-headless" suffix within 63 characters. */}}
{{- define "keyward.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "keyward.headlessName" -}}
{{- printf "%s-headless" (include "keyward.fullname" .) -}}
{{- end -}}

{{- define "keyward.envoyName" -}}
{{- printf "%s-envoy" (include "keyward.fullname" .) -}}
{{- end -}}

{{- define "keyward.migrateName" -}}
{{- printf "%s-migrate" (include "keyward.fullname" .) -}}
{{- end -}}

{{- define "keyward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keyward.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the connection strings: existingSecret or the chart's. */}}
{{- define "keyward.secretName" -}}
{{- default (include "keyward.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "keyward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keyward
{{- end -}}

{{/*
Selector labels of keyward's server pods. The component label keeps the
migration Job's and the example Envoy's pods out of keyward's Services,
PodDisruptionBudget and NetworkPolicy.
*/}}
{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "keyward.envoySelectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: envoy
{{- end -}}

{{/* Pods ------------------------------------------------------------------- */}}

{{- define "keyward.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "keyward.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Every container of the chart: not configurable on purpose. */}}
{{- define "keyward.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "keyward.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.delaySeconds .Values.shutdown.graceSeconds .Values.shutdown.marginSeconds -}}
{{- end -}}

{{/* TLS file locations (Secret volumes mounted as directories, no subPath). */}}
{{- define "keyward.tlsDir" -}}/etc/keyward/tls{{- end -}}
{{- define "keyward.clientCaDir" -}}/etc/keyward/client-ca{{- end -}}
{{- define "keyward.adminTlsDir" -}}/etc/keyward/admin-tls{{- end -}}
{{- define "keyward.adminClientCaDir" -}}/etc/keyward/admin-client-ca{{- end -}}

{{/* A secretKeyRef env entry: name, secret, key. */}}
{{- define "keyward.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/*
The environment of keyward's containers (server and migration Job). "job"
in the dict selects the Job's variant: only what `keyward migrate` reads.
`keyward migrate` connects to KEYWARD_LISTEN_DATABASE_URL when it is set
(migrations hold a session-level advisory lock, which a transaction-pooling
PgBouncer cannot carry), else to DATABASE_URL. So the Job gets
existingSecretKeys.migrationDatabaseUrl as DATABASE_URL and nothing else
when that key is set; otherwise the servers' DATABASE_URL and their direct
KEYWARD_LISTEN_DATABASE_URL, if any.
*/}}
{{- define "keyward.env" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $secret := include "keyward.secretName" $root -}}
{{- $dbKey := "DATABASE_URL" -}}
{{- $listenKey := "" -}}
{{- $redisKey := "" -}}
{{- if $v.existingSecret -}}
{{- $dbKey = $v.existingSecretKeys.databaseUrl -}}
{{- $listenKey = $v.existingSecretKeys.listenDatabaseUrl -}}
{{- $redisKey = $v.existingSecretKeys.redisUrl -}}
{{- if and .job $v.existingSecretKeys.migrationDatabaseUrl -}}
{{- $dbKey = $v.existingSecretKeys.migrationDatabaseUrl -}}
{{- $listenKey = "" -}}
{{- end -}}
{{- else -}}
{{- if $v.database.listenUrl }}{{ $listenKey = "KEYWARD_LISTEN_DATABASE_URL" }}{{ end -}}
{{- if $v.redis.url }}{{ $redisKey = "KEYWARD_REDIS_URL" }}{{ end -}}
{{- end -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{ include "keyward.secretEnv" (dict "name" "DATABASE_URL" "secret" $secret "key" $dbKey) }}
{{- if $listenKey }}
{{ include "keyward.secretEnv" (dict "name" "KEYWARD_LISTEN_DATABASE_URL" "secret" $secret "key" $listenKey) }}
{{- end }}
{{- if and $redisKey (not .job) }}
{{ include "keyward.secretEnv" (dict "name" "KEYWARD_REDIS_URL" "secret" $secret "key" $redisKey) }}
{{- end }}
- name: KEYWARD_DB_MAX_CONNECTIONS
  value: {{ $v.database.maxConnections | quote }}
- name: KEYWARD_MIGRATE_ON_START
  value: {{ (not $v.migrations.job.enabled) | quote }}
- name: KEYWARD_KEY_PREFIX
  value: {{ $v.config.keyPrefix | quote }}
- name: KEYWARD_LOG_FORMAT
  value: {{ $v.config.logFormat | quote }}
- name: RUST_LOG
  value: {{ $v.config.rustLog | quote }}
{{- if not .job }}
- name: KEYWARD_GRPC_ADDR
  value: {{ printf "0.0.0.0:%d" (int $v.grpc.port) | quote }}
- name: KEYWARD_METRICS_ADDR
  value: {{ printf "0.0.0.0:%d" (int $v.metrics.port) | quote }}
- name: KEYWARD_CACHE_MAX_BYTES
  value: {{ $v.config.cacheMaxBytes | quote }}
- name: KEYWARD_RUNTIME
  value: {{ $v.config.runtime | quote }}
{{- if $v.config.workerThreads }}
- name: KEYWARD_WORKER_THREADS
  value: {{ $v.config.workerThreads | quote }}
{{- end }}
- name: KEYWARD_SHUTDOWN_DELAY
  value: {{ printf "%ds" (int $v.shutdown.delaySeconds) | quote }}
- name: KEYWARD_SHUTDOWN_GRACE
  value: {{ printf "%ds" (int $v.shutdown.graceSeconds) | quote }}
{{- if $v.tls.enabled }}
- name: KEYWARD_TLS_CERT
  value: {{ printf "%s/tls.crt" (include "keyward.tlsDir" $root) | quote }}
- name: KEYWARD_TLS_KEY
  value: {{ printf "%s/tls.key" (include "keyward.tlsDir" $root) | quote }}
{{- if $v.tls.clientCa.enabled }}
- name: KEYWARD_TLS_CLIENT_CA
  value: {{ printf "%s/%s" (include "keyward.clientCaDir" $root) $v.tls.clientCa.key | quote }}
{{- end }}
{{- end }}
{{- if $v.admin.enabled }}
- name: KEYWARD_ADMIN_ADDR
  value: {{ printf "0.0.0.0:%d" (int $v.admin.port) | quote }}
{{- if $v.admin.tls.enabled }}
- name: KEYWARD_ADMIN_TLS_CERT
  value: {{ printf "%s/tls.crt" (include "keyward.adminTlsDir" $root) | quote }}
- name: KEYWARD_ADMIN_TLS_KEY
  value: {{ printf "%s/tls.key" (include "keyward.adminTlsDir" $root) | quote }}
{{- if $v.admin.tls.clientCa.enabled }}
- name: KEYWARD_ADMIN_TLS_CLIENT_CA
  value: {{ printf "%s/%s" (include "keyward.adminClientCaDir" $root) $v.admin.tls.clientCa.key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ $v.otel.serviceName | default (include "keyward.fullname" $root) | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.otel.tracesSampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.otel.tracesSamplerArg | quote }}
{{- $attrs := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" "k8s.node.name=$(NODE_NAME)" }}
{{- range $k, $val := $v.otel.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k $val) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- range $k, $val := $v.config.extraEnv }}
- name: {{ $k }}
  value: {{ $val | quote }}
{{- end }}
{{- end -}}

{{/* Checks the schema cannot express. */}}
{{- define "keyward.validate" -}}
{{- $v := .Values -}}
{{- if and $v.migrations.job.enabled (not $v.existingSecret) -}}
{{- fail "migrations.job.enabled needs existingSecret: the pre-install hook Job runs before the chart's own Secret exists (see values.yaml, migrations)" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret, e.g. a cert-manager Certificate's)" -}}
{{- end -}}
{{- if and $v.tls.clientCa.enabled (not $v.tls.enabled) -}}
{{- fail "tls.clientCa.enabled (mTLS) needs tls.enabled" -}}
{{- end -}}
{{- if and $v.admin.tls.enabled (not $v.admin.enabled) -}}
{{- fail "admin.tls.enabled needs admin.enabled (a separate admin listener)" -}}
{{- end -}}
{{- if and $v.admin.tls.enabled (not $v.admin.tls.secretName) -}}
{{- fail "admin.tls.enabled needs admin.tls.secretName" -}}
{{- end -}}
{{- if and $v.admin.tls.clientCa.enabled (not $v.admin.tls.enabled) -}}
{{- fail "admin.tls.clientCa.enabled needs admin.tls.enabled" -}}
{{- end -}}
{{- if and $v.admin.enabled (eq (int $v.admin.port) (int $v.grpc.port)) -}}
{{- fail "admin.port must differ from grpc.port" -}}
{{- end -}}
{{- if eq (int $v.metrics.port) (int $v.grpc.port) -}}
{{- fail "metrics.port must differ from grpc.port" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and $v.envoy.enabled $v.tls.enabled (not $v.envoy.keywardTls.secretName) -}}
{{- fail "envoy.enabled with tls.enabled needs envoy.keywardTls.secretName (ca.crt to verify keyward; tls.crt/tls.key for mTLS)" -}}
{{- end -}}
{{- end -}}
