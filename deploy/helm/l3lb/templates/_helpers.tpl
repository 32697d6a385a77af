{{/* Object names: the release name, so a release called l3lb matches deploy/manifests. */}}
{{- define "l3lb.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object; also the DaemonSet's selector (immutable after install). */}}
{{- define "l3lb.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The port of metricsAddress ("127.0.0.1:9477", "[::1]:9477"): the probes' port. */}}
{{- define "l3lb.metricsPort" -}}
{{- splitList ":" .Values.metricsAddress | last | int -}}
{{- end -}}

{{/* The address the probes reach metricsAddress at: its own, or for an unspecified
     address (0.0.0.0, [::]) the loopback address of its family. */}}
{{- define "l3lb.probeHost" -}}
{{- $host := regexReplaceAll ":[0-9]+$" .Values.metricsAddress "" | trimPrefix "[" | trimSuffix "]" -}}
{{- if eq $host "0.0.0.0" -}}127.0.0.1
{{- else if eq $host "::" -}}::1
{{- else -}}{{ $host }}
{{- end -}}
{{- end -}}

{{/* The agent's settings file (--config). Values are quoted: "[::1]:9477" is not plain YAML. */}}
{{- define "l3lb.settings" -}}
{{- $extra := .Values.extraSettings | default dict }}
{{- range $key := list "interface" "xdp_mode" "pin_path" "metrics_address" }}
{{- if hasKey $extra $key }}
{{- fail (printf "extraSettings.%s: the chart sets it (values interface, xdpMode, pinPath, metricsAddress; the pod mounts pinPath at /run/l3lb/bpf)" $key) }}
{{- end }}
{{- end }}
{{- if hasKey ($extra.kubernetes | default dict) "load_balancer_class" }}
{{- fail "extraSettings.kubernetes.load_balancer_class: the chart passes the value class as --class, which wins" }}
{{- end }}
interface: {{ .Values.interface | quote }}
xdp_mode: {{ .Values.xdpMode | quote }}
pin_path: /run/l3lb/bpf
metrics_address: {{ .Values.metricsAddress | quote }}
{{- with .Values.extraSettings }}
{{ toYaml . }}
{{- end }}
{{- end -}}
