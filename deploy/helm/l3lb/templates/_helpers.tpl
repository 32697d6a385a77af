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

{{/* The agent's settings file (--config). Values are quoted: "[::1]:9477" is not plain YAML. */}}
{{- define "l3lb.settings" -}}
interface: {{ .Values.interface | quote }}
xdp_mode: {{ .Values.xdpMode | quote }}
pin_path: {{ .Values.pinPath | quote }}
metrics_address: {{ .Values.metricsAddress | quote }}
{{- with .Values.extraSettings }}
{{ toYaml . }}
{{- end }}
{{- end -}}
