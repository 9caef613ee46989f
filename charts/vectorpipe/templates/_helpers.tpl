{{/* The release's full name, at most 63 characters. */}}
{{- define "vectorpipe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "vectorpipe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "vectorpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vectorpipe
{{- end -}}

{{/* Labels that select the operator pods. */}}
{{- define "vectorpipe.selectorLabels" -}}
app.kubernetes.io/name: vectorpipe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "vectorpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vectorpipe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The operator's rules: the same as operator/rbac/clusterrole.yaml (a test compares them). Bound
cluster-wide, or in each of watchNamespaces only.
*/}}
{{- define "vectorpipe.operatorRules" -}}
  # The API it serves: read pipelines and policies, write their status, scale pipelines.
  - apiGroups: ["vectorpipe.io"]
    resources: ["embeddingpipelines", "scalingpolicies"]
    verbs: ["get", "list", "watch"]
  # Pipelines' metadata.finalizers (deleteIndexOnDelete). The operator never writes a spec: a
  # test applies pipelines as another field manager and finds no spec field owned by it.
  - apiGroups: ["vectorpipe.io"]
    resources: ["embeddingpipelines"]
    verbs: ["patch"]
  - apiGroups: ["vectorpipe.io"]
    resources: ["embeddingpipelines/status", "scalingpolicies/status"]
    verbs: ["get", "patch", "update"]
  - apiGroups: ["vectorpipe.io"]
    resources: ["embeddingpipelines/scale"]
    verbs: ["get", "patch", "update"]
  # Owner references with blockOwnerDeletion need update on the owner's finalizers.
  - apiGroups: ["vectorpipe.io"]
    resources: ["embeddingpipelines/finalizers"]
    verbs: ["update"]
  # The worker objects it creates.
  - apiGroups: ["apps"]
    resources: ["deployments"]
    verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
  - apiGroups: [""]
    resources: ["configmaps", "services"]
    verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
  - apiGroups: ["policy"]
    resources: ["poddisruptionbudgets"]
    verbs: ["get", "create", "patch", "update", "delete"]
  # Secrets a pipeline names, read by name and used only when labeled
  # vectorpipe.io/credentials=true; never listed or watched.
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["get"]
  # Events users see in kubectl describe.
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
{{- end }}
