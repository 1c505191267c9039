{{/* Labels every object of the release carries. */}}
{{- define "streamvqa.labels" -}}
app.kubernetes.io/name: streamvqa
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: Helm
streamvqa.io/schema-version: {{ .Values.schemaVersion | quote }}
{{- end }}

{{/* Selector labels of the release (component added by each template). */}}
{{- define "streamvqa.selector" -}}
app.kubernetes.io/name: streamvqa
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Kafka bootstrap address: the value, else the Strimzi cluster of this chart. */}}
{{- define "streamvqa.bootstrap" -}}
{{- if .Values.kafka.bootstrapServers -}}
{{ .Values.kafka.bootstrapServers }}
{{- else -}}
{{ printf "%s-kafka-bootstrap.%s.svc:9092" .Values.kafka.clusterName .Release.Namespace }}
{{- end -}}
{{- end }}

{{/* Flink durable storage root: s3://<checkpoint bucket>/<release>. */}}
{{- define "streamvqa.flinkStorage" -}}
{{ printf "s3://%s/%s" .Values.objectStore.checkpointBucket .Release.Name }}
{{- end }}

{{/*
The settings of the pipeline as STREAMVQA_* environment variables (pydantic-settings, nested
delimiter "__", see streamvqa/settings.py). The same list goes to the job submitter and to the
Beam SDK workers, so both build the same Settings object.
*/}}
{{- define "streamvqa.env" -}}
- name: STREAMVQA_KAFKA__BOOTSTRAP_SERVERS
  value: {{ include "streamvqa.bootstrap" . | quote }}
- name: STREAMVQA_KAFKA__SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: STREAMVQA_S3__ENDPOINT
  value: {{ .Values.objectStore.endpoint | quote }}
- name: STREAMVQA_S3__SECURE
  value: {{ .Values.objectStore.secure | quote }}
- name: STREAMVQA_S3__REGION
  value: {{ .Values.objectStore.region | quote }}
- name: STREAMVQA_S3__BUCKET
  value: {{ .Values.objectStore.bucket | quote }}
- name: STREAMVQA_S3__ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.objectStore.credentialsSecret }}
      key: accessKey
- name: STREAMVQA_S3__SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.objectStore.credentialsSecret }}
      key: secretKey
- name: STREAMVQA_TOPICS__FRAMES
  value: {{ .Values.topics.names.frames | quote }}
- name: STREAMVQA_TOPICS__AUDIO
  value: {{ .Values.topics.names.audio | quote }}
- name: STREAMVQA_TOPICS__QUERIES
  value: {{ .Values.topics.names.queries | quote }}
- name: STREAMVQA_TOPICS__ANSWERS
  value: {{ .Values.topics.names.answers | quote }}
- name: STREAMVQA_TOPICS__DEAD_LETTER
  value: {{ .Values.topics.names.deadLetter | quote }}
- name: STREAMVQA_TOPICS__MEMORY
  value: {{ .Values.topics.names.memory | quote }}
- name: STREAMVQA_TOPICS__PARTITIONS
  value: {{ .Values.topics.partitions | quote }}
- name: STREAMVQA_TOPICS__REPLICATION_FACTOR
  value: {{ .Values.topics.replicationFactor | quote }}
- name: STREAMVQA_LIMITS__MAX_MESSAGE_BYTES
  value: {{ .Values.limits.maxMessageBytes | quote }}
{{- if .Values.pipeline.settings.lmPath }}
- name: STREAMVQA_PIPELINE__LM_PATH
  value: {{ .Values.pipeline.settings.lmPath | quote }}
{{- end }}
- name: STREAMVQA_PIPELINE__LM_DTYPE
  value: {{ .Values.pipeline.settings.lmDtype | quote }}
- name: STREAMVQA_PIPELINE__WINDOW_TOKENS
  value: {{ .Values.pipeline.settings.windowTokens | quote }}
- name: STREAMVQA_PIPELINE__RETRIEVE_TOKENS
  value: {{ .Values.pipeline.settings.retrieveTokens | quote }}
- name: STREAMVQA_PIPELINE__MAX_NEW_TOKENS
  value: {{ .Values.pipeline.settings.maxNewTokens | quote }}
- name: STREAMVQA_PIPELINE__HOLD_TIMEOUT_S
  value: {{ .Values.pipeline.settings.holdTimeoutS | quote }}
- name: STREAMVQA_PIPELINE__SPEECH
  value: {{ .Values.pipeline.settings.speech | quote }}
- name: STREAMVQA_PIPELINE__MODEL_TIMEOUT_S
  value: {{ .Values.pipeline.settings.modelTimeoutS | quote }}
- name: STREAMVQA_PIPELINE__MODEL_ATTEMPTS
  value: {{ .Values.pipeline.settings.modelAttempts | quote }}
- name: STREAMVQA_RUNNER__NAME
  value: "PortableRunner"
- name: STREAMVQA_RUNNER__JOB_ENDPOINT
  value: {{ printf "%s-beam-job-server:%v" .Release.Name .Values.jobServer.ports.job | quote }}
- name: STREAMVQA_RUNNER__PARALLELISM
  value: {{ .Values.flink.parallelism | quote }}
{{- if .Values.flink.maxParallelism }}
- name: STREAMVQA_RUNNER__MAX_PARALLELISM
  value: {{ .Values.flink.maxParallelism | quote }}
{{- end }}
- name: STREAMVQA_RUNNER__CHECKPOINTING_INTERVAL_MS
  value: {{ .Values.flink.checkpointing.intervalMs | quote }}
- name: STREAMVQA_RUNNER__CHECKPOINTING_MODE
  value: {{ .Values.flink.checkpointing.mode | quote }}
{{- if .Values.flink.checkpointing.timeoutMs }}
- name: STREAMVQA_RUNNER__CHECKPOINT_TIMEOUT_MS
  value: {{ .Values.flink.checkpointing.timeoutMs | quote }}
{{- end }}
{{- if .Values.flink.checkpointing.minPauseMs }}
- name: STREAMVQA_RUNNER__MIN_PAUSE_BETWEEN_CHECKPOINTS_MS
  value: {{ .Values.flink.checkpointing.minPauseMs | quote }}
{{- end }}
- name: STREAMVQA_RUNNER__STATE_BACKEND
  value: {{ .Values.flink.stateBackend | quote }}
- name: STREAMVQA_RUNNER__STATE_BACKEND_STORAGE_PATH
  value: {{ printf "%s/checkpoints" (include "streamvqa.flinkStorage" .) | quote }}
- name: STREAMVQA_RUNNER__ENVIRONMENT_TYPE
  value: "EXTERNAL"
- name: STREAMVQA_RUNNER__ENVIRONMENT_CONFIG
  value: {{ printf "localhost:%v" .Values.flink.workerPool.port | quote }}
{{- end }}

{{/* Container security context shared by every container the chart defines. */}}
{{- define "streamvqa.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Pod security context (uid/gid from values). */}}
{{- define "streamvqa.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Ray processes: no usage reports, token auth with the token from a Secret. */}}
{{- define "streamvqa.rayEnv" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: RAY_AUTH_MODE
  value: "token"
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ray.authTokenSecret }}
      key: token
{{- end }}
