#!/usr/bin/env python3
"""Renders deploy/helm/l3lb with Helm's own code and compares it with deploy/manifests.

There is no `helm` binary to be had on the project's machines, and no API server, but
PyPI's `helm-sdkpy` ships Helm 4 itself (compiled Go, as a shared library) with its
install action. This script runs that install against a small stand-in API server that
answers discovery, reports that no release and no objects exist, and records the objects
Helm creates: Helm reads the chart, merges the values and executes the templates exactly
as `helm install` would; the stand-in only receives the result.

Checks:
  1. With default values and release `l3lb` in `l3lb-system`, the chart renders the plain
     manifests' objects (less the Namespace, which Helm leaves to --create-namespace),
     ignoring what Helm adds at install time (managed-by label, release annotations) and
     the chart's checksum/settings annotation; the settings file is compared as YAML.
  2. With other values (another release name, namespace and class, takeUnclassed, an
     IPv6 metrics address, extra settings, a memory limit, no priority class) the objects
     say what the values say.
  3. The probes of an agent listening on 0.0.0.0 or [::] go to the family's loopback.
  4. extraSettings naming a field the chart writes itself fails the render, naming it.
  5. image.digest replaces the tag; imagePullSecrets reach the pod.
  6. metricsOnNodeIP passes status.hostIP as L3LB_METRICS_HOST and probes the pod IP.

Usage (Python >= 3.12, which helm-sdkpy requires):
  python3.12 -m venv /tmp/helm-venv && /tmp/helm-venv/bin/pip install helm-sdkpy pyyaml
  /tmp/helm-venv/bin/python deploy/helm/check-render.py
Exit status 0 when every check holds; the differences otherwise.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from helm_sdkpy import Configuration, Install

DEPLOY = Path(__file__).resolve().parent.parent
CHART = DEPLOY / "helm" / "l3lb"
MANIFESTS = DEPLOY / "manifests"


def _resource(name: str, kind: str, namespaced: bool) -> dict:
    return {
        "name": name,
        "singularName": kind.lower(),
        "namespaced": namespaced,
        "kind": kind,
        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
    }


def _group(name: str) -> dict:
    gv = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {"name": name, "versions": [gv], "preferredVersion": gv}


DISCOVERY = {
    "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"},
    "/api": {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    },
    "/apis": {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group("apps"), _group("rbac.authorization.k8s.io")],
    },
    "/api/v1": {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            _resource("namespaces", "Namespace", False),
            _resource("serviceaccounts", "ServiceAccount", True),
            _resource("configmaps", "ConfigMap", True),
            _resource("secrets", "Secret", True),
        ],
    },
    "/apis/apps/v1": {
        "kind": "APIResourceList",
        "groupVersion": "apps/v1",
        "resources": [_resource("daemonsets", "DaemonSet", True)],
    },
    "/apis/rbac.authorization.k8s.io/v1": {
        "kind": "APIResourceList",
        "groupVersion": "rbac.authorization.k8s.io/v1",
        "resources": [
            _resource("clusterroles", "ClusterRole", False),
            _resource("clusterrolebindings", "ClusterRoleBinding", False),
        ],
    },
}


class StandIn(BaseHTTPRequestHandler):
    """Discovery, empty lists, 404 for every object, and a record of every create."""

    created: list[dict] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict | None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "json" in (self.headers.get("Content-Type") or ""):
            return json.loads(raw or b"{}")
        return None  # protobuf: Helm's release record (a Secret), not a chart object

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path in DISCOVERY:
            return self._send(200, DISCOVERY[path])
        if path.endswith("/secrets") or path.endswith("/configmaps"):
            kind = "SecretList" if path.endswith("/secrets") else "ConfigMapList"
            empty = {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}
            return self._send(200, empty)
        self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

    def _answer(self, code: int, record: bool) -> None:
        obj = self._body()
        if obj is None:
            obj = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "release"}, "type": "helm.sh/release.v1"}
        elif record:
            StandIn.created.append(copy.deepcopy(obj))
        md = obj.setdefault("metadata", {})
        md.setdefault("uid", str(uuid.uuid4()))
        md["resourceVersion"] = "2"
        md.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self._send(code, obj)

    def do_POST(self) -> None:
        self._answer(201, record=True)

    def do_PUT(self) -> None:
        self._answer(200, record=False)

    def do_PATCH(self) -> None:
        self._answer(200, record=False)


def render(values: dict, release: str = "l3lb", namespace: str = "l3lb-system") -> list[dict]:
    """The objects `helm install RELEASE CHART -n NAMESPACE` with `values` creates."""
    StandIn.created = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}],
            "users": [{"name": "u", "user": {"token": "stand-in"}}],
            "current-context": "c",
        }
    )
    config = Configuration(namespace=namespace, kubeconfig=kubeconfig)
    failure: list[BaseException] = []

    def install() -> None:
        try:
            asyncio.run(
                Install(config).run(
                    release,
                    str(CHART),
                    values=values,
                    disable_openapi_validation=True,
                    server_side_apply=False,
                )
            )
        except BaseException as e:  # reported below if nothing was created
            failure.append(e)

    # Helm may go on watching the objects' status after creating them; the objects are
    # what this needs, so stop once creation has been quiet for a few seconds.
    threading.Thread(target=install, daemon=True).start()
    seen, last = 0, time.time()
    while time.time() - last < 4 and not failure:
        time.sleep(0.2)
        if len(StandIn.created) != seen:
            seen, last = len(StandIn.created), time.time()
    server.shutdown()
    if failure and not StandIn.created:
        raise SystemExit(f"helm install failed: {failure[0]}")
    return copy.deepcopy(StandIn.created)


def normalise(obj: dict) -> dict:
    """Drops what Helm adds at install time and parses the settings file."""
    obj = copy.deepcopy(obj)
    md = obj.get("metadata", {})
    md.get("labels", {}).pop("app.kubernetes.io/managed-by", None)
    for key in ("meta.helm.sh/release-name", "meta.helm.sh/release-namespace"):
        md.get("annotations", {}).pop(key, None)
    if md.get("annotations") == {}:
        del md["annotations"]
    if obj.get("kind") == "DaemonSet":
        tmd = obj["spec"]["template"]["metadata"]
        tmd.get("annotations", {}).pop("checksum/settings", None)
        if tmd.get("annotations") == {}:
            del tmd["annotations"]
    if obj.get("kind") == "ConfigMap":
        obj["data"] = {k: yaml.safe_load(v) for k, v in obj["data"].items()}
    return obj


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: normalise(o) for o in objects}


def diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)} != {json.dumps(b)}"]


def main() -> int:
    failures = []

    plain = {}
    for f in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc["kind"] != "Namespace":
                plain[doc["kind"]] = normalise(doc)

    default = by_kind(render({}))
    print(f"default values: rendered {sorted(default)}")
    if sorted(default) != sorted(plain):
        failures.append(f"kinds differ: chart {sorted(default)} manifests {sorted(plain)}")
    for kind in sorted(set(default) & set(plain)):
        for d in diff(plain[kind], default[kind]):
            failures.append(f"{kind}: manifests vs chart: {d}")

    values = {
        "class": "example.com/edge",
        "takeUnclassed": True,
        "interface": "bond0",
        "xdpMode": "native",
        "metricsAddress": "[::1]:9500",
        "extraSettings": {"conntrack_size": 1048576, "decap": {"allow": ["10.0.0.0/24"]}},
        "logLevel": "debug",
        "image": {"repository": "registry.example/l3lb", "tag": "0.1.0-test"},
        "resources": {"limits": {"memory": "1Gi"}},
        "priorityClassName": "",
    }
    other = by_kind(render(values, release="edge", namespace="lb"))
    ds = other["DaemonSet"]
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    settings = other["ConfigMap"]["data"]["l3lb.yaml"]
    expect = [
        (
            agent["args"],
            [
                "run",
                "--kubernetes",
                "--config=/etc/l3lb/l3lb.yaml",
                "--class=example.com/edge",
                "--take-unclassed",
                "--log-level=debug",
            ],
        ),
        (agent["image"], "registry.example/l3lb:0.1.0-test"),
        (agent["readinessProbe"]["httpGet"]["port"], 9500),
        (agent["livenessProbe"]["httpGet"]["port"], 9500),
        # An agent on [::1] answers there, not on 127.0.0.1.
        (agent["readinessProbe"]["httpGet"]["host"], "::1"),
        (agent["livenessProbe"]["httpGet"]["host"], "::1"),
        (agent["ports"][0]["containerPort"], 9500),
        # Helm merges maps with the defaults: the requests stay (null would remove them).
        (agent["resources"], {"limits": {"memory": "1Gi"}, "requests": {"cpu": "50m", "memory": "128Mi"}}),
        ("priorityClassName" in ds["spec"]["template"]["spec"], False),
        (
            settings,
            {
                "interface": "bond0",
                "xdp_mode": "native",
                "pin_path": "/run/l3lb/bpf",
                "metrics_address": "[::1]:9500",
                "conntrack_size": 1048576,
                "decap": {"allow": ["10.0.0.0/24"]},
            },
        ),
        (ds["metadata"]["name"], "edge"),
        (ds["metadata"]["namespace"], "lb"),
        (other["ClusterRoleBinding"]["subjects"], [{"kind": "ServiceAccount", "name": "edge", "namespace": "lb"}]),
        (other["ClusterRoleBinding"]["roleRef"]["name"], "edge"),
        (ds["spec"]["template"]["spec"]["serviceAccountName"], "edge"),
        (ds["spec"]["template"]["spec"]["volumes"][1]["configMap"]["name"], "edge"),
    ]
    for got, want in expect:
        if got != want:
            failures.append(f"other values: got {json.dumps(got)}, want {json.dumps(want)}")
    print(f"other values: rendered {sorted(other)}, {len(expect)} expectations")

    # An unspecified metrics address is probed on its family's loopback address.
    for address, host in [("0.0.0.0:9477", "127.0.0.1"), ("[::]:9478", "::1")]:
        agent = by_kind(render({"metricsAddress": address}))["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
        for probe in ["readinessProbe", "livenessProbe"]:
            got = agent[probe]["httpGet"]["host"]
            if got != host:
                failures.append(f"metricsAddress {address}: {probe} host {got}, want {host}")
    print("unspecified metrics addresses: probed on loopback")

    # Settings the chart writes itself are refused in extraSettings, naming the field.
    for extra, field in [
        ({"pin_path": "/sys/fs/bpf/other"}, "extraSettings.pin_path"),
        ({"interface": "eth1"}, "extraSettings.interface"),
        ({"kubernetes": {"load_balancer_class": "x"}}, "extraSettings.kubernetes.load_balancer_class"),
    ]:
        try:
            render({"extraSettings": extra})
            failures.append(f"extraSettings {extra}: rendered, want a failure naming {field}")
        except SystemExit as e:
            if field not in str(e):
                failures.append(f"extraSettings {extra}: failed without naming {field}: {e}")
    # Legitimate extraSettings still render: none at all (null), or kubernetes settings.
    for extra in [None, {"kubernetes": {"node_health_check": {"interval": "10s"}}}, {"kubernetes": None}]:
        try:
            render({"extraSettings": extra})
        except SystemExit as e:
            failures.append(f"extraSettings {extra}: {e}")
    print("extraSettings: the chart's own fields refused, others rendered")

    # A private registry: pull secrets and an image pinned by digest.
    digest = "sha256:" + "ab" * 32
    pod = by_kind(
        render({"image": {"repository": "registry.example/l3lb", "digest": digest}, "imagePullSecrets": [{"name": "regcred"}]})
    )["DaemonSet"]["spec"]["template"]["spec"]
    for got, want in [
        (pod["containers"][0]["image"], f"registry.example/l3lb@{digest}"),
        (pod.get("imagePullSecrets"), [{"name": "regcred"}]),
    ]:
        if got != want:
            failures.append(f"private registry: got {json.dumps(got)}, want {json.dumps(want)}")
    print("private registry: digest and pull secrets")

    # Metrics on the node's address: the host from the downward API, probes at the pod IP.
    agent = by_kind(render({"metricsOnNodeIP": True}))["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in agent["env"]}
    want_env = {"name": "L3LB_METRICS_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    if env.get("L3LB_METRICS_HOST") != want_env:
        failures.append(f"metricsOnNodeIP: env {json.dumps(agent['env'])}")
    for probe in ["readinessProbe", "livenessProbe"]:
        if "host" in agent[probe]["httpGet"]:
            failures.append(f"metricsOnNodeIP: {probe} names a host: {agent[probe]['httpGet']}")
    print("metrics on the node's address: host from status.hostIP, probes at the pod IP")

    for f in failures:
        print("FAIL", f)
    print("ok" if not failures else f"{len(failures)} differences")
    sys.stdout.flush()
    # Helm's watcher threads may still run; they hold nothing worth waiting for.
    os._exit(1 if failures else 0)


if __name__ == "__main__":
    main()
