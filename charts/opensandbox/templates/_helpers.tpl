{{/* Names, labels and images shared by every template. */}}

{{- define "opensandbox.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "opensandbox.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; "component" is gateway or controller. */}}
{{- define "opensandbox.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "opensandbox.selector" . }}
{{- end -}}

{{- define "opensandbox.selector" -}}
app.kubernetes.io/name: {{ include "opensandbox.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image: .root, .component values, .name (image name under image.registry) */}}
{{- define "opensandbox.image" -}}
{{- $repo := default (printf "%s/%s" .root.Values.image.registry .name) .values.image.repository -}}
{{- $tag := default (default .root.Chart.AppVersion .root.Values.image.tag) .values.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "opensandbox.gateway.name" -}}
{{- printf "%s-gateway" (include "opensandbox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "opensandbox.controller.name" -}}
{{- printf "%s-controller" (include "opensandbox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "opensandbox.gateway.serviceAccount" -}}
{{- default (include "opensandbox.gateway.name" .) .Values.gateway.serviceAccount.name -}}
{{- end -}}

{{- define "opensandbox.controller.serviceAccount" -}}
{{- default (include "opensandbox.controller.name" .) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{- define "opensandbox.gateway.service" -}}
{{- default (include "opensandbox.gateway.name" .) .Values.gateway.service.name -}}
{{- end -}}

{{/* The Secret holding the signing keys file, or "" when there are no keys. */}}
{{- define "opensandbox.gateway.keysSecret" -}}
{{- if .Values.gateway.secureAccess.existingSecret -}}
{{- .Values.gateway.secureAccess.existingSecret -}}
{{- else if .Values.gateway.secureAccess.keys -}}
{{- printf "%s-keys" (include "opensandbox.gateway.name" .) -}}
{{- end -}}
{{- end -}}

{{/* Whether a provider is on: .root and .provider. */}}
{{- define "opensandbox.gateway.watches" -}}
{{- $p := .root.Values.gateway.providers -}}
{{- if or (eq $p "both") (eq $p .provider) -}}true{{- end -}}
{{- end -}}

{{/* Contradictions no schema can express; each fails the render with the key at fault. */}}
{{- define "opensandbox.validate" -}}
{{- $g := .Values.gateway -}}
{{- if and $g.secureAccess.existingSecret $g.secureAccess.keys -}}
{{- fail "gateway.secureAccess: set keys or existingSecret, not both (the keys would be ignored)" -}}
{{- end -}}
{{- if and $g.enabled (le (int $g.terminationGracePeriodSeconds) (int $g.shutdownGraceSeconds)) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must be larger than gateway.shutdownGraceSeconds (%v), or the kubelet kills the gateway while it drains" $g.terminationGracePeriodSeconds $g.shutdownGraceSeconds) -}}
{{- end -}}
{{- if and (eq $g.workload "DaemonSet") (not (kindIs "invalid" $g.replicas)) -}}
{{- fail "gateway.replicas applies to workload: Deployment only; a DaemonSet runs one gateway per node (leave gateway.replicas unset)" -}}
{{- end -}}
{{- if and (eq $g.workload "DaemonSet") $g.topologySpreadConstraints -}}
{{- fail "gateway.topologySpreadConstraints applies to workload: Deployment only; a DaemonSet runs one gateway per node" -}}
{{- end -}}
{{- if and (ne $g.service.type "NodePort") $g.service.nodePort -}}
{{- fail "gateway.service.nodePort is set but gateway.service.type is not NodePort" -}}
{{- end -}}
{{- if and (ne $g.service.type "NodePort") $g.tls.nodePort -}}
{{- fail "gateway.tls.nodePort is set but gateway.service.type is not NodePort" -}}
{{- end -}}
{{- if and $g.tls.secrets (or (eq (int $g.tls.port) (int $g.port)) (eq (int $g.tls.port) (int $g.metricsPort))) -}}
{{- fail (printf "gateway.tls.port (%v) must differ from gateway.port and gateway.metricsPort" $g.tls.port) -}}
{{- end -}}
{{- if and $g.http2.h2c (not $g.http2.enabled) -}}
{{- fail "gateway.http2.h2c needs gateway.http2.enabled (set h2c: false to turn HTTP/2 off)" -}}
{{- end -}}
{{- if and (eq $g.service.type "ClusterIP") $g.service.loadBalancerSourceRanges -}}
{{- fail "gateway.service.loadBalancerSourceRanges needs gateway.service.type: LoadBalancer" -}}
{{- end -}}
{{- $monitoring := or (and $g.enabled $g.serviceMonitor.enabled) (and .Values.controller.enabled .Values.controller.serviceMonitor.enabled) .Values.monitoring.prometheusRule.enabled .Values.monitoring.sidecarPodMonitor.enabled -}}
{{- if and $monitoring (not (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
{{- fail "serviceMonitor, monitoring.prometheusRule or monitoring.sidecarPodMonitor is on but the cluster does not serve monitoring.coreos.com/v1 (install the Prometheus Operator's CRDs first; with helm template, pass --api-versions monitoring.coreos.com/v1)" -}}
{{- end -}}
{{- end -}}
