{{/* Names and labels. */}}
{{- define "quiver.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quiver.fullname" -}}
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

{{- define "quiver.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quiver.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quiver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "quiver.labels" -}}
helm.sh/chart: {{ include "quiver.chart" . }}
{{ include "quiver.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "quiver.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "quiver.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* [registry/]repository, the serving image's name without tag or digest. */}}
{{- define "quiver.imageName" -}}
{{- $registry := .Values.image.registry | trimSuffix "/" -}}
{{- if $registry }}{{ printf "%s/%s" $registry .Values.image.repository }}{{ else }}{{ .Values.image.repository }}{{ end -}}
{{- end }}

{{- define "quiver.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.device) -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" (include "quiver.imageName" .) .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" (include "quiver.imageName" .) $tag -}}
{{- end -}}
{{- end }}

{{/* The training image (Dockerfile target `training`): the serving one leaves the training extra out. */}}
{{- define "quiver.trainingImage" -}}
{{- $t := .Values.training.image -}}
{{- $repo := include "quiver.imageName" . -}}
{{- if $t.repository }}{{ $repo = $t.repository }}{{ end -}}
{{- printf "%s:%s" $repo ($t.tag | default (printf "%s-%s-training" .Chart.AppVersion .Values.device)) -}}
{{- end }}

{{- define "quiver.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-keys" (include "quiver.fullname" .)) }}
{{- end }}

{{- define "quiver.modelCacheClaim" -}}
{{- .Values.modelCache.persistence.existingClaim | default (printf "%s-model-cache" (include "quiver.fullname" .)) }}
{{- end }}

{{- define "quiver.adapterStoreURL" -}}
{{- printf "s3://%s/%s" .Values.adapterStore.s3.bucket (trimAll "/" .Values.adapterStore.s3.prefix) | trimSuffix "/" }}
{{- end }}

{{- define "quiver.adapterStoreClaim" -}}
{{- .Values.adapterStore.persistence.existingClaim | default (printf "%s-adapters" (include "quiver.fullname" .)) }}
{{- end }}

{{/* Base URL of the Service, as the training Job and NOTES reach it. */}}
{{- define "quiver.serviceURL" -}}
{{- printf "http://%s.%s.svc:%d" (include "quiver.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}

{{/* The most replicas that can ever run at once. */}}
{{- define "quiver.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ max (int .Values.autoscaling.maxReplicas) (int .Values.replicaCount) }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/* Grace period: the preStop pause plus the drain, plus a margin for the engine to exit. */}}
{{- define "quiver.terminationGracePeriod" -}}
{{- $needed := add (int .Values.preStopSleepSeconds) (int .Values.server.drainTimeoutSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 15 }}
{{- else if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + server.drainTimeoutSeconds (%d), or in-flight requests are killed mid-drain" (int .Values.terminationGracePeriodSeconds) (int $needed)) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Refuse settings that would deploy but not work: several replicas on a store only one node can mount
(the second pod would hang in ContainerCreating, or worse, each would see its own registry).
*/}}
{{- define "quiver.validate" -}}
{{- $replicas := int (include "quiver.maxReplicas" .) }}
{{- $s3 := eq .Values.adapterStore.backend "s3" }}
{{- if and $s3 (not .Values.adapterStore.s3.bucket) }}
{{- fail "adapterStore.backend s3 needs adapterStore.s3.bucket" }}
{{- end }}
{{- if gt $replicas 1 }}
{{- $store := .Values.adapterStore.persistence }}
{{- if and (not $s3) (not $store.existingClaim) (ne $store.accessMode "ReadWriteMany") }}
{{- fail (printf "%d replicas share one adapter store: set adapterStore.persistence.accessMode=ReadWriteMany (or an RWX existingClaim), or use adapterStore.backend=s3" $replicas) }}
{{- end }}
{{- $cache := .Values.modelCache.persistence }}
{{- if and $cache.enabled (not $cache.existingClaim) (eq $cache.accessMode "ReadWriteOnce") }}
{{- fail (printf "%d replicas cannot share a ReadWriteOnce model cache: set modelCache.persistence.accessMode=ReadWriteMany, or modelCache.persistence.enabled=false for a per-pod cache" $replicas) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- $m := .Values.model }}
{{- $cache := .Values.modelCache.persistence }}
{{- if and $m.path (not $m.volume) (not (or $cache.enabled $cache.existingClaim)) }}
{{- fail "model.path is set but no volume holds it (modelCache.persistence is off): set model.volume, e.g. {persistentVolumeClaim: {claimName: my-models, readOnly: true}}, with model.path under model.mountPath" }}
{{- end }}
{{- if and $m.volume (not $m.path) }}
{{- fail "model.volume needs model.path (the model folder inside it)" }}
{{- end }}
{{- if and $m.volume (not (hasPrefix (printf "%s/" (trimSuffix "/" $m.mountPath)) $m.path)) }}
{{- fail (printf "model.path (%s) must lie under model.mountPath (%s), where model.volume is mounted" $m.path $m.mountPath) }}
{{- end }}
{{- if and (eq .Values.device "gpu") (gt (int .Values.engine.tensorParallelSize) (int .Values.gpu.count)) }}
{{- fail (printf "engine.tensorParallelSize (%d) needs at least as many GPUs per pod: gpu.count is %d" (int .Values.engine.tensorParallelSize) (int .Values.gpu.count)) }}
{{- end }}
{{- $store := .Values.adapterStore.persistence }}
{{- if and .Values.finetuning.worker.enabled (not $s3) (not $store.existingClaim) (ne $store.accessMode "ReadWriteMany") }}
{{- fail "finetuning.worker shares the adapter store (and the job records on it) with the servers from other nodes: set adapterStore.persistence.accessMode=ReadWriteMany (or an RWX existingClaim), or use adapterStore.backend=s3" }}
{{- end }}
{{- if and .Values.training.enabled (not (or .Values.training.data.existingClaim .Values.training.data.configMap)) }}
{{- fail "training.enabled needs training.data.existingClaim or training.data.configMap (holding train.jsonl)" }}
{{- end }}
{{- end }}

{{/* The QUIVER_* environment shared by the server and the init container. */}}
{{- define "quiver.env" -}}
- name: QUIVER_MODEL_CACHE_DIR
  value: {{ .Values.modelCache.mountPath | quote }}
- name: QUIVER_STORE_DIR
  value: {{ .Values.adapterStore.mountPath | quote }}
- name: QUIVER_STATE_DIR
  value: /var/lib/quiver/run
- name: HF_HUB_OFFLINE
  value: {{ ternary "1" "0" .Values.model.offline | quote }}
{{- with .Values.model.path }}
- name: QUIVER_MODEL
  value: {{ . | quote }}
{{- end }}
{{- if ne .Values.adapterStore.backend "s3" }}
# Uploaded training files and job records beside the adapters, on the same shared volume (the store skips
# dot folders); with an S3 store they live in its bucket instead.
- name: QUIVER_FINETUNING_DIR
  value: {{ printf "%s/.finetuning" .Values.adapterStore.mountPath | quote }}
{{- end }}
- name: QUIVER_FINETUNING_POLL_S
  value: {{ .Values.finetuning.pollSeconds | quote }}
- name: QUIVER_FINETUNING_LEASE_S
  value: {{ .Values.finetuning.leaseSeconds | quote }}
{{- end }}

{{/* The S3 adapter store's environment (server and fine-tuning worker): the bucket, its endpoint, credentials. */}}
{{- define "quiver.s3Env" -}}
{{- if eq .Values.adapterStore.backend "s3" }}
{{- $store := .Values.adapterStore.s3 }}
- name: QUIVER_STORE_URL
  value: {{ include "quiver.adapterStoreURL" . | quote }}
- name: QUIVER_STORE_CACHE_DIR
  value: /var/lib/quiver/adapter-cache
{{- with $store.endpoint }}
- name: QUIVER_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $store.addressingStyle }}
- name: QUIVER_S3_ADDRESSING_STYLE
  value: {{ . | quote }}
{{- end }}
{{- with $store.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $store.credentials.existingSecret }}
# Read by the AWS SDK's standard credential chain; quiver never sees them as settings.
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $store.credentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $store.credentials.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}
